//! Where a dataset lives: a local directory or a prefix of an S3 bucket,
//! behind one `object_store` interface.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use caudal_core::config::FilesSinkConfig;
use caudal_core::{Error, ErrorKind, Result};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;

/// An opened dataset location. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Location {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// The dataset's prefix in `store`.
    pub(crate) root: ObjectPath,
    /// The local directory of a local dataset (files are staged there and
    /// renamed into place).
    pub(crate) local: Option<PathBuf>,
    /// The url as written (for messages), without credentials.
    pub display: String,
}

fn storage_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Connect, format!("{what}: {e}"))
}

impl Location {
    /// Whether the dataset can be written (`caudal doctor`): puts a small
    /// probe object under the dataset's prefix and deletes it again.
    pub async fn probe(&self) -> caudal_core::probe::Finding {
        use caudal_core::probe::Finding;
        use object_store::ObjectStoreExt as _;
        let name = format!(".caudal-doctor-{}", std::process::id());
        let path = ObjectPath::from(format!("{}/{name}", self.root));
        let written = self
            .store
            .put(&path, bytes::Bytes::from_static(b"caudal doctor\n").into())
            .await;
        match written {
            Ok(_) => {
                let _ = self.store.delete(&path).await;
                Finding::ok("write", format!("{} is writable", self.display))
            }
            Err(e) => Finding::fail(
                "write",
                format!("cannot write to {}: {e}", self.display),
                if self.local.is_some() {
                    "make the directory writable by the user caudal runs as"
                } else {
                    "check the bucket's name, region, endpoint and credentials \
                     (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), and that they may put objects"
                },
            ),
        }
    }

    /// Opens the location of a `files` sink; a relative directory is
    /// relative to `config_dir`. A local directory is created when missing.
    pub fn open(config: &FilesSinkConfig, config_dir: &Path) -> Result<Self> {
        let url = config.url.trim();
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3 = &config.s3;
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(endpoint) = s3
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            {
                b = b
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint);
            }
            let region = s3
                .region
                .clone()
                .or_else(|| std::env::var("AWS_REGION").ok())
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                .unwrap_or_else(|| "us-east-1".into());
            b = b
                .with_region(region)
                .with_virtual_hosted_style_request(!s3.path_style);
            if let Some(key) = &s3.access_key_id {
                b = b.with_access_key_id(key.expose());
            }
            if let Some(secret) = &s3.secret_access_key {
                b = b.with_secret_access_key(secret.expose());
            }
            let store = b
                .build()
                .map_err(|e| Error::new(ErrorKind::Config, format!("{url}: {e}")))?;
            return Ok(Self {
                store: Arc::new(store),
                root: ObjectPath::from(prefix.trim_matches('/')),
                local: None,
                display: format!("s3://{bucket}/{}", prefix.trim_matches('/')),
            });
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        let dir = config_dir.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot create the dataset directory {}: {e}", dir.display()),
            )
        })?;
        let dir = dir.canonicalize().unwrap_or(dir);
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| Error::new(ErrorKind::Config, format!("{}: {e}", dir.display())))?;
        Ok(Self {
            store: Arc::new(store),
            root: ObjectPath::default(),
            display: dir.display().to_string(),
            local: Some(dir),
        })
    }

    /// The object path of `relative` (slash-separated) below the dataset.
    pub(crate) fn path(&self, relative: &str) -> ObjectPath {
        let mut parts: Vec<&str> = self
            .root
            .as_ref()
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        parts.extend(relative.split('/').filter(|p| !p.is_empty()));
        ObjectPath::from(parts.join("/"))
    }

    /// The object's bytes, or `None` when it does not exist.
    pub(crate) async fn get(&self, relative: &str) -> Result<Option<bytes::Bytes>> {
        use object_store::ObjectStoreExt as _;
        match self.store.get(&self.path(relative)).await {
            Ok(r) => {
                Ok(Some(r.bytes().await.map_err(|e| {
                    storage_error(&format!("reading {relative}"), e)
                })?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage_error(&format!("reading {relative}"), e)),
        }
    }

    /// Writes a small object whole and at once (a manifest).
    pub(crate) async fn put(&self, relative: &str, data: Vec<u8>) -> Result<()> {
        use object_store::ObjectStoreExt as _;
        self.store
            .put(&self.path(relative), data.into())
            .await
            .map(|_| ())
            .map_err(|e| storage_error(&format!("writing {relative}"), e))
    }

    /// Deletes an object; one already gone is fine.
    pub(crate) async fn delete(&self, relative: &str) -> Result<()> {
        use object_store::ObjectStoreExt as _;
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_error(&format!("deleting {relative}"), e)),
        }
    }

    /// Every object below `relative`, as (path below the dataset, size,
    /// last modified).
    pub(crate) async fn list(&self, relative: &str) -> Result<Vec<(String, u64, jiff::Timestamp)>> {
        use futures::TryStreamExt as _;
        let prefix = self.path(relative);
        let root = self.root.as_ref().trim_matches('/').to_string();
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| storage_error(&format!("listing {relative}"), e))?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                let rel = if root.is_empty() {
                    full.to_string()
                } else {
                    full.strip_prefix(&root)
                        .map(|r| r.trim_start_matches('/').to_string())
                        .unwrap_or_else(|| full.to_string())
                };
                let at = jiff::Timestamp::from_second(m.last_modified.timestamp())
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                (rel, m.size, at)
            })
            .collect())
    }

    /// Uploads a finished local file to `relative` (S3: a multipart upload
    /// completed only after its last part, so the object appears whole or
    /// not at all), or renames it into place (local: same directory).
    pub(crate) async fn publish(&self, staged: &Path, relative: &str) -> Result<()> {
        if let Some(dir) = &self.local {
            let target = dir.join(relative);
            return tokio::fs::rename(staged, &target).await.map_err(|e| {
                storage_error(
                    &format!(
                        "moving {} into place as {}",
                        staged.display(),
                        target.display()
                    ),
                    e,
                )
            });
        }
        use object_store::ObjectStoreExt as _;
        use tokio::io::AsyncReadExt as _;
        let upload = self
            .store
            .put_multipart(&self.path(relative))
            .await
            .map_err(|e| storage_error(&format!("starting the upload of {relative}"), e))?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        let mut file = tokio::fs::File::open(staged)
            .await
            .map_err(|e| storage_error(&format!("opening {}", staged.display()), e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| storage_error(&format!("reading {}", staged.display()), e))?;
            if n == 0 {
                break;
            }
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| storage_error(&format!("uploading {relative}"), e))?;
            writer.write(&buf[..n]);
        }
        writer
            .finish()
            .await
            .map_err(|e| storage_error(&format!("completing the upload of {relative}"), e))?;
        let _ = tokio::fs::remove_file(staged).await;
        Ok(())
    }
}
