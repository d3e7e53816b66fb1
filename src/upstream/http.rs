//! A plain HTTP origin: a URL template with `{image_id}`, expected size from
//! `Content-Length`, expected checksums from configured response headers.

use super::{ImageMeta, ImageStream, UpstreamError, hex_digest, http_error, status_error};
use crate::cache::HashAlgo;
use crate::image_id::ImageId;

pub struct HttpUpstream {
    pub client: reqwest::Client,
    pub url_template: String,
    pub md5_header: Option<String>,
    pub sha512_header: Option<String>,
}

impl HttpUpstream {
    pub async fn fetch(&self, id: &ImageId) -> Result<(ImageMeta, ImageStream), UpstreamError> {
        let url = self.url_template.replace("{image_id}", id.as_str());
        let response = self.client.get(&url).send().await.map_err(http_error)?;
        if !response.status().is_success() {
            return Err(status_error(response.status(), &format!("GET {url}")));
        }
        let header = |name: &Option<String>, len: usize| {
            name.as_ref()
                .and_then(|n| response.headers().get(n.as_str()))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| hex_digest(v, len))
        };
        let meta = ImageMeta {
            size: response.content_length(),
            md5: header(&self.md5_header, 32),
            os_hash: header(&self.sha512_header, 128).map(|h| (HashAlgo::Sha512, h)),
        };
        Ok((meta, ImageStream::Http(response)))
    }
}
