//! The cache API with Keystone tokens, against the real Keystone 30.0.0 (the kit's).

use crate::kit::keystone::Keystone;

/// The kit's Keystone issues tokens whose roles are the ones granted, and validates
/// them as keystonemiddleware asks (`GET /v3/auth/tokens`).
#[tokio::test]
async fn keystone_kit_issues_tokens_with_the_roles_granted() {
    let Some(keystone) = Keystone::start() else {
        return;
    };
    let project = keystone.create_project("kit-project").await;
    keystone
        .create_user("kit-member", "member-secret", &project, "member")
        .await;
    let token = keystone
        .token("kit-member", "member-secret", "kit-project")
        .await;
    let admin = keystone.admin_token().await;
    let client = reqwest::Client::new();
    let validated: serde_json::Value = client
        .get(format!("{}/auth/tokens", keystone.auth_url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles: Vec<&str> = validated["token"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"member"), "{validated}");
    assert!(!roles.contains(&"admin"), "{validated}");
    let bogus = client
        .get(format!("{}/auth/tokens", keystone.auth_url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", "gAAAAAB-not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(bogus.status(), 404, "{}", keystone.log_text());
}
