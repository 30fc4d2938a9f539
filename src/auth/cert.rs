//! `auth = "mtls"`: the principal of a client certificate the TLS handshake verified against
//! `[server] tls.client_ca_file` (`crate::server::tls`). By the time a request gets here the
//! chain, validity and key usage were checked by rustls; this module only reads names from the
//! end-entity certificate, with `x509-parser`.
//!
//! The same facts (subject parts, SANs, SPIFFE id) come from an `x-forwarded-client-cert`
//! header for `auth = "trusted-header"` (`super::xfcc`), so both share [`CertFacts`].

use std::collections::BTreeMap;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::{AuthError, Peer, Principal};
use crate::config::RouteAuth;
use crate::config::auth::{CertIdentity, MtlsSettings};

/// What a certificate (or a proxy's account of one) says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertFacts {
    /// Subject attributes in certificate order: (`CN` | `O` | `OU` | `C` | `L` | `ST`, value).
    pub subject: Vec<(String, String)>,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub emails: Vec<String>,
}

impl CertFacts {
    /// Read the end-entity certificate (DER). Attacker-supplied bytes in general; here they
    /// were verified by the handshake, but a parse failure is still an error, never a panic.
    pub fn from_der(der: &[u8]) -> Result<CertFacts, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut facts = CertFacts::default();
        let subject = cert.subject();
        for rdn in subject.iter() {
            for atv in rdn.iter() {
                let oid = atv.attr_type();
                let key = if *oid == x509_parser::oid_registry::OID_X509_COMMON_NAME {
                    "CN"
                } else if *oid == x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME {
                    "O"
                } else if *oid == x509_parser::oid_registry::OID_X509_ORGANIZATIONAL_UNIT {
                    "OU"
                } else if *oid == x509_parser::oid_registry::OID_X509_COUNTRY_NAME {
                    "C"
                } else if *oid == x509_parser::oid_registry::OID_X509_LOCALITY_NAME {
                    "L"
                } else if *oid == x509_parser::oid_registry::OID_X509_STATE_OR_PROVINCE_NAME {
                    "ST"
                } else {
                    continue;
                };
                // Non-string values (rare, e.g. a BMPString some tools write) are skipped.
                if let Ok(v) = atv.as_str() {
                    facts.subject.push((key.to_string(), v.to_string()));
                }
            }
        }
        match cert.subject_alternative_name() {
            Ok(Some(san)) => {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::URI(u) => facts.uris.push(u.to_string()),
                        GeneralName::DNSName(d) => facts.dns.push(d.to_string()),
                        GeneralName::RFC822Name(e) => facts.emails.push(e.to_string()),
                        _ => {}
                    }
                }
            }
            Ok(None) => {}
            Err(e) => return Err(format!("unreadable subject alternative names: {e}")),
        }
        Ok(facts)
    }

    fn subject_part(&self, key: &str) -> Option<&str> {
        self.subject
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first `spiffe://` URI SAN, split into trust domain and path (`/ns/x/sa/y`).
    fn spiffe(&self) -> Option<(&str, &str)> {
        self.uris.iter().find_map(|u| {
            let rest = u
                .get(..9)
                .filter(|s| s.eq_ignore_ascii_case("spiffe://"))
                .map(|_| &u[9..])?;
            match rest.find('/') {
                Some(i) => Some((&rest[..i], &rest[i..])),
                None => Some((rest, "")),
            }
        })
    }

    /// One of `config::auth::CERT_FIELDS`; the first value when the certificate has several.
    pub fn field(&self, field: &str) -> Option<String> {
        let v = match field {
            "subject.CN" => self.subject_part("CN"),
            "subject.O" => self.subject_part("O"),
            "subject.OU" => self.subject_part("OU"),
            "subject.C" => self.subject_part("C"),
            "subject.L" => self.subject_part("L"),
            "subject.ST" => self.subject_part("ST"),
            "san.uri" => self.uris.first().map(String::as_str),
            "san.dns" => self.dns.first().map(String::as_str),
            "san.email" => self.emails.first().map(String::as_str),
            "spiffe.trust_domain" => self.spiffe().map(|(td, _)| td),
            "spiffe.path" => self.spiffe().map(|(_, p)| p),
            _ => None,
        };
        v.filter(|v| !v.is_empty()).map(str::to_string)
    }

    /// The principal these facts name: identity per `how`, attributes per `attributes`
    /// (attribute name → certificate field; a field the certificate lacks is left out).
    pub fn principal(
        &self,
        method: RouteAuth,
        how: CertIdentity,
        attributes: &BTreeMap<String, String>,
    ) -> Result<Principal, AuthError> {
        let name = match how {
            CertIdentity::UriSan => self
                .uris
                .first()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| AuthError::Invalid("client certificate has no URI SAN".into()))?,
            CertIdentity::SubjectCn => self
                .subject_part("CN")
                .filter(|c| !c.is_empty())
                .ok_or_else(|| AuthError::Invalid("client certificate has no subject CN".into()))?,
        };
        let mut p = Principal::new(name, method);
        for (attr, field) in attributes {
            if let Some(v) = self.field(field) {
                p.attributes.insert(attr.clone(), v);
            }
        }
        Ok(p)
    }
}

/// `auth = "mtls"`.
#[derive(Debug)]
pub struct MtlsAuthenticator {
    settings: MtlsSettings,
}

impl MtlsAuthenticator {
    pub fn new(settings: &MtlsSettings) -> MtlsAuthenticator {
        MtlsAuthenticator {
            settings: settings.clone(),
        }
    }

    pub fn authenticate(&self, peer: &Peer) -> Result<Principal, AuthError> {
        let Some(end_entity) = peer.certs.as_ref().and_then(|c| c.first()) else {
            return Err(AuthError::Missing("client certificate"));
        };
        self.principal(end_entity)
    }

    fn principal(&self, cert: &CertificateDer<'_>) -> Result<Principal, AuthError> {
        let facts = CertFacts::from_der(cert).map_err(AuthError::Invalid)?;
        facts.principal(
            RouteAuth::Mtls,
            self.settings.identity,
            &self.settings.attributes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cert(cn: &str, sans: &[rcgen::SanType]) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "billing");
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "DE");
        params.subject_alt_names = sans.to_vec();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn peer(certs: Option<Vec<CertificateDer<'static>>>) -> Peer {
        Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            certs: certs.map(Arc::new),
            unix: false,
        }
    }

    fn settings(identity: CertIdentity) -> MtlsSettings {
        MtlsSettings {
            identity,
            attributes: [
                ("team", "subject.OU"),
                ("org", "subject.O"),
                ("country", "subject.C"),
                ("td", "spiffe.trust_domain"),
                ("sp", "spiffe.path"),
                ("host", "san.dns"),
                ("mail", "san.email"),
                ("city", "subject.L"),
            ]
            .into_iter()
            .map(|(a, f)| (a.to_string(), f.to_string()))
            .collect(),
        }
    }

    #[test]
    fn spiffe_identity_and_attributes() {
        let c = cert(
            "api",
            &[
                rcgen::SanType::URI(
                    rcgen::string::Ia5String::try_from("spiffe://acme.test/ns/billing/sa/api")
                        .unwrap(),
                ),
                rcgen::SanType::DnsName(
                    rcgen::string::Ia5String::try_from("api.acme.test").unwrap(),
                ),
                rcgen::SanType::Rfc822Name(
                    rcgen::string::Ia5String::try_from("ops@acme.test").unwrap(),
                ),
            ],
        );
        let a = MtlsAuthenticator::new(&settings(CertIdentity::UriSan));
        let p = a.authenticate(&peer(Some(vec![c.clone()]))).unwrap();
        assert_eq!(p.name, "spiffe://acme.test/ns/billing/sa/api");
        assert_eq!(p.method, RouteAuth::Mtls);
        assert_eq!(p.attributes["team"], "billing");
        assert_eq!(p.attributes["org"], "Acme");
        assert_eq!(p.attributes["country"], "DE");
        assert_eq!(p.attributes["td"], "acme.test");
        assert_eq!(p.attributes["sp"], "/ns/billing/sa/api");
        assert_eq!(p.attributes["host"], "api.acme.test");
        assert_eq!(p.attributes["mail"], "ops@acme.test");
        // Absent fields are absent, not empty.
        assert!(!p.attributes.contains_key("city"));
        assert!(p.claims.is_empty());

        let a = MtlsAuthenticator::new(&settings(CertIdentity::SubjectCn));
        assert_eq!(a.authenticate(&peer(Some(vec![c]))).unwrap().name, "api");
    }

    #[test]
    fn missing_and_unusable_certificates() {
        let a = MtlsAuthenticator::new(&settings(CertIdentity::UriSan));
        assert_eq!(
            a.authenticate(&peer(None)),
            Err(AuthError::Missing("client certificate"))
        );
        assert_eq!(
            a.authenticate(&peer(Some(vec![]))),
            Err(AuthError::Missing("client certificate"))
        );
        // No URI SAN: refused under uri-san, fine under subject-cn.
        let c = cert("web", &[]);
        assert!(matches!(
            a.authenticate(&peer(Some(vec![c.clone()]))),
            Err(AuthError::Invalid(m)) if m.contains("URI SAN")
        ));
        let cn = MtlsAuthenticator::new(&settings(CertIdentity::SubjectCn));
        assert_eq!(cn.authenticate(&peer(Some(vec![c]))).unwrap().name, "web");
        // Garbage DER: an error, never a panic.
        for junk in [&b""[..], b"\x30", b"\x30\x82\xff\xff", &[0u8; 64]] {
            assert!(matches!(
                a.authenticate(&peer(Some(vec![CertificateDer::from(junk.to_vec())]))),
                Err(AuthError::Invalid(_))
            ));
        }
    }

    #[test]
    fn spiffe_parts() {
        let f = CertFacts {
            uris: vec!["https://x".into(), "SPIFFE://td".into()],
            ..Default::default()
        };
        assert_eq!(f.field("spiffe.trust_domain").as_deref(), Some("td"));
        assert_eq!(f.field("spiffe.path"), None);
        assert_eq!(f.field("san.uri").as_deref(), Some("https://x"));
        assert_eq!(f.field("no.such"), None);
    }
}
