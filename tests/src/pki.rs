//! Certificates for TLS tests, made with rcgen: CAs, server and client certificates, written
//! in the directory layout qemu's `tls-creds-x509` and libnbd's `tls-certificates=DIR` read
//! (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`; the server's as `server-*.pem`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that signs the other certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A signed certificate and its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn params(cn: &str, sans: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate names");
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let mut p = params(cn, &[]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("self-signed CA");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, mut p: CertificateParams) -> Issued {
        // qemu refuses a certificate without key encipherment, whatever its key type.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Issued {
        let mut p = params("blockd test server", &["127.0.0.1", "localhost"]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(p)
    }

    /// A client certificate; `expired` makes one that ran out in 2021.
    pub fn client(&self, expired: bool) -> Issued {
        let mut p = params("blockd test client", &[]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.issue(p)
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write PEM");
}

/// Writes a server's files into `dir`: `server-cert.pem`, `server-key.pem`, and `ca-cert.pem`
/// (the CA its clients' certificates must come from).
pub fn server_dir(dir: &Path, server: &Issued, client_ca: &Ca) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    write(dir, "server-cert.pem", &server.cert_pem);
    write(dir, "server-key.pem", &server.key_pem);
    write(dir, "ca-cert.pem", &client_ca.pem());
    dir.to_path_buf()
}

/// Writes a client's directory: the CA it trusts for the server, and its own certificate.
pub fn client_dir(dir: &Path, server_ca: &Ca, client: &Issued) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    write(dir, "ca-cert.pem", &server_ca.pem());
    write(dir, "client-cert.pem", &client.cert_pem);
    write(dir, "client-key.pem", &client.key_pem);
    dir.to_path_buf()
}
