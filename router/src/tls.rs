//! TLS for the device listener (rustls) and mTLS identity: a client certificate signed
//! by --client-ca names the device (subject CN) and its account (a configurable field).
//! Owns certificate loading and parsing; never logs key material.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use uuid::Uuid;
use x509_parser::prelude::{AttributeTypeAndValue, FromDer, X509Certificate};

use crate::auth::Identity;
use crate::config::ServeConfig;

/// Build the rustls server config from the flags; None when TLS is off.
pub(crate) fn server_config(cfg: &ServeConfig) -> anyhow::Result<Option<Arc<ServerConfig>>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut BufReader::new(
        File::open(cert).with_context(|| format!("opening --tls-cert {}", cert.display()))?,
    ))
    .collect::<Result<_, _>>()
    .context("parsing --tls-cert")?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        File::open(key).with_context(|| format!("opening --tls-key {}", key.display()))?,
    ))
    .context("parsing --tls-key")?
    .context("--tls-key holds no private key")?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut BufReader::new(
                File::open(ca).with_context(|| format!("opening --client-ca {}", ca.display()))?,
            )) {
                roots
                    .add(c.context("parsing --client-ca")?)
                    .context("adding a --client-ca certificate")?;
            }
            // Optional: devices without a certificate still authenticate with a token.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut sc = builder
        .with_single_cert(certs, key)
        .context("--tls-cert/--tls-key do not match")?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(sc)))
}

/// The identity a verified client certificate names, if it names a valid one.
/// rustls has already checked the chain against --client-ca before this is called.
pub(crate) fn identity_from_cert(der: &[u8], account_field: &str) -> Option<Identity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let cn = first_str(subject.iter_common_name())?;
    let account = match account_field {
        "o" => first_str(subject.iter_organization()),
        // userId, 0.9.2342.19200300.100.1.1
        "uid" => first_str(
            subject
                .iter_attributes()
                .filter(|a| a.attr_type().to_id_string() == "0.9.2342.19200300.100.1.1"),
        ),
        _ => first_str(subject.iter_organizational_unit()),
    }?;
    Some(Identity::new(
        Uuid::parse_str(cn.trim()).ok()?,
        Uuid::parse_str(account.trim()).ok()?,
    ))
}

fn first_str<'a>(mut it: impl Iterator<Item = &'a AttributeTypeAndValue<'a>>) -> Option<String> {
    it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
}
