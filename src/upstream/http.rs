//! A plain HTTP origin: a URL template with `{image_id}`, expected size from
//! `Content-Length`, expected checksums from configured response headers.

use super::{
    ImageMeta, ImageStream, UpstreamError, hex_digest, http_error, request_text, status_error,
};
use crate::digest::HashAlgo;
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
            return Err(status_error(response.status(), &request_text("GET", &url)));
        }
        // A configured checksum header must be there and well formed: without it the
        // bytes could not be verified.
        let header = |name: &Option<String>, len: usize| -> Result<Option<String>, UpstreamError> {
            let Some(name) = name else { return Ok(None) };
            let Some(value) = response.headers().get(name.as_str()) else {
                return Err(UpstreamError::MissingDigestHeader {
                    request: request_text("GET", &url),
                    header: name.clone(),
                });
            };
            let value = value
                .to_str()
                .map_err(|_| UpstreamError::DigestHeaderNotText {
                    request: request_text("GET", &url),
                    header: name.clone(),
                })?;
            hex_digest(&format!("header {name}"), value, len).map(Some)
        };
        let meta = ImageMeta {
            size: response.content_length(),
            md5: header(&self.md5_header, 32)?,
            os_hash: header(&self.sha512_header, HashAlgo::Sha512.hex_len())?
                .map(|h| (HashAlgo::Sha512, h)),
        };
        Ok((meta, ImageStream::Http(response)))
    }
}
