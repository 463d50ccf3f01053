//! TLS of MySQL/MariaDB connections: a source's `tls` setting, read once
//! (its CA, certificate and key files) and applied alike to the SQL
//! driver's pool (cursor reads, CDC snapshots and catalog queries) and to
//! the binary log reader's replica connection, so every connection of a
//! source checks the server the same way.
//!
//! Unset `tls` means plain connections on both paths; `required` encrypts
//! without checking; `verify_ca` checks the chain; `verify_identity` (the
//! default once `tls` is set) checks the chain and the host name. Nothing
//! here falls back to a weaker mode: a server that cannot meet the mode
//! refuses the connection.

use caudal_core::config::{MysqlTls, MysqlTlsMode};
use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};

/// A source's TLS setting with its files read.
#[derive(Clone, Debug, Default)]
pub(crate) struct MysqlTlsFiles {
    mode: Option<MysqlTlsMode>,
    ca: Option<Vec<u8>>,
    /// The client certificate chain and its key, both PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl MysqlTlsFiles {
    /// Reads the files `tls` names; an error names the field and the file.
    pub(crate) fn load(tls: Option<&MysqlTls>) -> Result<Self, String> {
        let Some(tls) = tls else {
            return Ok(Self::default());
        };
        if tls.mode == MysqlTlsMode::Disabled {
            return Ok(Self::default());
        }
        let ca = match &tls.ca {
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("tls.ca: cannot read {path}: {e}"))?;
                if !holds_certificate(&pem) {
                    return Err(format!("tls.ca: {path} holds no PEM certificate"));
                }
                Some(pem)
            }
            None => None,
        };
        let identity = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let chain = std::fs::read(cert)
                    .map_err(|e| format!("tls.cert: cannot read {cert}: {e}"))?;
                if !holds_certificate(&chain) {
                    return Err(format!("tls.cert: {cert} holds no PEM certificate"));
                }
                let key = key.read().map_err(|e| format!("tls.key: {e}"))?;
                Some((chain, key.expose().as_bytes().to_vec()))
            }
            (None, None) => None,
            _ => return Err("tls: a client certificate needs both cert and key".into()),
        };
        Ok(Self {
            mode: Some(tls.mode),
            ca,
            identity,
        })
    }

    /// The mode in force (`disabled` when `tls` is unset).
    pub(crate) fn mode(&self) -> MysqlTlsMode {
        self.mode.unwrap_or(MysqlTlsMode::Disabled)
    }

    /// The SQL driver's options with this TLS. Unset `tls` turns TLS off
    /// explicitly: the driver's own default would try it without checking
    /// anything, and the binary log reader would not.
    pub(crate) fn apply(&self, options: MySqlConnectOptions) -> MySqlConnectOptions {
        let mut options = options.ssl_mode(match self.mode() {
            MysqlTlsMode::Disabled => MySqlSslMode::Disabled,
            MysqlTlsMode::Required => MySqlSslMode::Required,
            MysqlTlsMode::VerifyCa => MySqlSslMode::VerifyCa,
            MysqlTlsMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
        });
        if let Some(ca) = &self.ca {
            options = options.ssl_ca_from_pem(ca.clone());
        }
        if let Some((chain, key)) = &self.identity {
            options = options
                .ssl_client_cert_from_pem(chain)
                .ssl_client_key_from_pem(key);
        }
        options
    }

    /// The replica connection's TLS, `None` for plain connections.
    /// `verify_ca` is refused by the config check for CDC sources (this
    /// driver checks names whatever it is told), so it never gets here
    /// weaker than asked.
    pub(crate) fn ssl_opts(&self) -> Option<mysql_async::SslOpts> {
        use mysql_async::{ClientIdentity, SslOpts};
        let mode = self.mode();
        if mode == MysqlTlsMode::Disabled {
            return None;
        }
        let mut opts = SslOpts::default()
            .with_danger_accept_invalid_certs(mode == MysqlTlsMode::Required)
            .with_danger_skip_domain_validation(mode == MysqlTlsMode::VerifyCa);
        if let Some(ca) = &self.ca {
            // A private CA replaces the public roots: trusting both would
            // accept any publicly trusted certificate for the host.
            opts = opts
                .with_root_certs(vec![ca.clone().into()])
                .with_disable_built_in_roots(true);
        }
        if let Some((chain, key)) = &self.identity {
            opts = opts.with_client_identity(Some(ClientIdentity::new(
                chain.clone().into(),
                key.clone().into(),
            )));
        }
        Some(opts)
    }
}

fn holds_certificate(pem: &[u8]) -> bool {
    pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(text: &str) -> MysqlTls {
        toml::from_str(text).expect("a tls table")
    }

    #[test]
    fn unset_tls_turns_tls_off_on_both_paths() {
        let files = MysqlTlsFiles::load(None).expect("nothing to read");
        assert_eq!(files.mode(), MysqlTlsMode::Disabled);
        assert!(files.ssl_opts().is_none());
        let options = files.apply(MySqlConnectOptions::new());
        assert!(matches!(options.get_ssl_mode(), MySqlSslMode::Disabled));
    }

    #[test]
    fn an_empty_tls_table_verifies_the_identity() {
        let files = MysqlTlsFiles::load(Some(&tls(""))).expect("nothing to read");
        assert_eq!(files.mode(), MysqlTlsMode::VerifyIdentity);
        let opts = files.ssl_opts().expect("TLS on");
        assert!(!opts.accept_invalid_certs());
        assert!(!opts.skip_domain_validation());
        let options = files.apply(MySqlConnectOptions::new());
        assert!(matches!(
            options.get_ssl_mode(),
            MySqlSslMode::VerifyIdentity
        ));
    }

    #[test]
    fn missing_files_are_named() {
        let e = MysqlTlsFiles::load(Some(&tls("ca = \"/nonexistent/ca.pem\"")))
            .expect_err("no such file");
        assert!(
            e.starts_with("tls.ca: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().expect("a directory");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").expect("write");
        let e = MysqlTlsFiles::load(Some(&tls(&format!("ca = {:?}", empty.display()))))
            .expect_err("not PEM");
        assert!(e.ends_with("holds no PEM certificate"), "{e}");
    }
}
