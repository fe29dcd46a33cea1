//! A test PKI made afresh by each test: a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate, and what the failure
//! tests need (a second, unrelated CA; a server certificate for another
//! name), as PEM files in a temporary directory.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files of a test PKI (all PEM).
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Makes the CA and every certificate below, in a temporary directory.
    pub fn new() -> Pki {
        Pki::new_in(&std::env::temp_dir())
    }

    /// [`Pki::new`] in a temporary directory below `parent`.
    pub fn new_in(parent: &Path) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("mdcache-pki-")
            .tempdir_in(parent)
            .unwrap();
        let (ca, ca_pem) = authority("metadatacache test CA");
        let (other, other_pem) = authority("an unrelated CA");
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other_pem).unwrap();
        let server_names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        leaf(dir.path(), "server", &ca, server_names.clone(), Use::Server);
        leaf(
            dir.path(),
            "client",
            &ca,
            vec!["client".to_owned()],
            Use::Client,
        );
        // Signed by the right CA, but for another host name.
        leaf(
            dir.path(),
            "misnamed",
            &ca,
            vec!["db.example.invalid".to_owned()],
            Use::Server,
        );
        // For the right names, but signed by a CA the clients do not trust.
        leaf(dir.path(), "untrusted", &other, server_names, Use::Server);
        leaf(
            dir.path(),
            "untrusted-client",
            &other,
            vec!["client".to_owned()],
            Use::Client,
        );
        Pki { dir }
    }

    /// What a server presents (`cert`) and whose clients it accepts (those
    /// with a certificate signed by [`ca`](Pki::ca)).
    pub fn server_tls(&self, cert: &CertFiles) -> super::servers::ServerTls {
        super::servers::ServerTls {
            ca: self.ca(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed `server`, `client` and `misnamed`.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed none of the certificates the servers present.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// The server certificate: 127.0.0.1 and localhost, signed by [`ca`](Pki::ca).
    pub fn server(&self) -> CertFiles {
        self.files("server")
    }

    /// A client certificate signed by [`ca`](Pki::ca).
    pub fn client(&self) -> CertFiles {
        self.files("client")
    }

    /// A server certificate signed by [`ca`](Pki::ca) for `db.example.invalid` only.
    pub fn misnamed(&self) -> CertFiles {
        self.files("misnamed")
    }

    /// A server certificate for 127.0.0.1 and localhost signed by
    /// [`other_ca`](Pki::other_ca).
    pub fn untrusted(&self) -> CertFiles {
        self.files("untrusted")
    }

    /// A client certificate signed by [`other_ca`](Pki::other_ca).
    pub fn untrusted_client(&self) -> CertFiles {
        self.files("untrusted-client")
    }

    fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        }
    }
}

enum Use {
    Server,
    Client,
}

fn authority(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

fn leaf(dir: &Path, name: &str, ca: &Issuer<'static, KeyPair>, names: Vec<String>, usage: Use) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match usage {
        Use::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            // etcd also uses its server certificate as a client of itself.
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Use::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}
