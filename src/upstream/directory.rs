//! A directory of `<image_id>` files, such as Glance's filesystem store.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::{ImageMeta, ImageStream, UpstreamError};
use crate::image_id::ImageId;

pub struct DirectoryUpstream {
    pub path: PathBuf,
}

impl DirectoryUpstream {
    pub async fn fetch(&self, id: &ImageId) -> Result<(ImageMeta, ImageStream), UpstreamError> {
        // The path names an entry of the directory itself (`file_in`); the open refuses
        // symlinks, and non-regular files are refused below.
        let path = crate::cache::layout::file_in(&self.path, id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
            )
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => UpstreamError::NoSuchFile { path: path.clone() },
                _ => UpstreamError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| UpstreamError::Stat {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(UpstreamError::NotRegularFile { path });
        }
        let image = ImageMeta {
            size: Some(meta.len()),
            ..Default::default()
        };
        Ok((image, ImageStream::File(tokio::fs::File::from_std(file))))
    }
}
