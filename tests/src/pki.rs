//! Test certificates made with rcgen: a CA and agent certificates with any flaw a test needs.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What goes into an agent certificate.
pub struct CertSpec {
    pub uris: Vec<String>,
    pub client_auth: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertSpec {
    /// A good agent certificate for `id`, valid from an hour ago for an hour.
    pub fn agent(id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![id.to_owned()],
            client_auth: true,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::hours(1),
        }
    }

    /// An agent certificate for `id` that expires `secs` seconds from now, on a whole second
    /// (X.509 times have one-second resolution). A lifetime still to come is stretched by
    /// [`crate::patience`], so an emulated guest gets through the steps that precede the
    /// deadline.
    pub fn agent_expiring(id: &str, secs: i64) -> Self {
        let secs = if secs > 0 {
            crate::patience(std::time::Duration::from_secs(secs as u64)).as_secs() as i64
        } else {
            secs
        };
        let not_after = (OffsetDateTime::now_utc() + Duration::seconds(secs))
            .replace_nanosecond(0)
            .expect("a whole second");
        Self {
            not_after,
            ..Self::agent(id)
        }
    }
}

/// PEM texts of a certificate and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Its private key (PEM): for a control plane that issues with it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn issue(&self, spec: &CertSpec) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "agent");
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("URI")))
            .collect();
        params.extended_key_usages = vec![if spec.client_auth {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // As the X509-SVID standard has a leaf: not a CA, said explicitly.
        params.is_ca = IsCa::ExplicitNoCa;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        // A positive serial with no leading zero byte, so every encoder writes it the same way.
        let mut serial: Vec<u8> = rand::random::<[u8; 8]>().to_vec();
        serial[0] = (serial[0] & 0x7f) | 0x10;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        }
    }

    /// A server certificate for an IP address (serverAuth), valid for a day.
    pub fn issue_server(&self, ip: std::net::IpAddr) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "control plane");
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(1);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: Vec::new(),
        }
    }

    /// A PEM CRL signed by this CA listing `serials`.
    /// A CRL listing `serials`, numbered above every CRL made before it in this process
    /// (a control plane refuses a CRL numbered below the one in force), good for an hour.
    pub fn crl(&self, serials: &[&[u8]]) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
        let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.crl_numbered(serials, number, Duration::hours(1))
    }

    /// A CRL with the CRL number `number`, whose nextUpdate is `next_in` from now (negative:
    /// past).
    pub fn crl_numbered(&self, serials: &[&[u8]], number: u64, next_in: Duration) -> String {
        let now = OffsetDateTime::now_utc();
        let this_update = (now - Duration::minutes(1)).min(now + next_in - Duration::minutes(1));
        let params = CertificateRevocationListParams {
            this_update,
            next_update: now + next_in,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("CRL")
            .pem()
            .expect("PEM")
    }
}

/// An admin's Ed25519 signing key pair, written as `NAME.key` (PKCS#8 PEM, what `--sign-key`
/// takes) and `NAME.pub` (SPKI PEM, what `[signers]` and `--trusted-signer` take).
pub fn signing_keypair(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (private, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    std::fs::write(&private, k.serialize_pem()).unwrap();
    std::fs::write(&public, k.public_key_pem()).unwrap();
    (private, public)
}
