//! AWS KMS as a root-key backend: GenerateDataKey / Encrypt / Decrypt with the key context as
//! KMS EncryptionContext (KMS refuses to decrypt under any other context).
//!
//! Credentials come from the SDK's standard chain (environment, shared config and credentials
//! files with profiles, web identity for Kubernetes IRSA, container and instance metadata), or
//! from a named profile. The SDK's own retries are off: [`super::resilience`] owns retries,
//! deadlines and the circuit breaker for every remote backend alike. TLS is rustls with ring,
//! like the rest of the proxy.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use zeroize::Zeroize;

use super::{BackendError, DataKey, GeneratedKey, KeyDescription, RootKeyProvider};
use crate::config::KmsSettings;
use crate::envelope::{Context, WrappedKey};

pub struct AwsKms {
    name: String,
    client: Client,
    /// Configured key names (aliases, ids) → the key ARN KMS reported for them.
    arns: std::sync::RwLock<HashMap<String, String>>,
}

impl AwsKms {
    fn learn(&self, configured: &str, arn: &str) {
        if configured != arn {
            let mut map = self.arns.write().unwrap_or_else(|e| e.into_inner());
            map.entry(configured.to_string())
                .or_insert_with(|| arn.to_string());
        }
    }
}

impl AwsKms {
    pub async fn connect(name: &str, settings: &KmsSettings) -> Result<AwsKms, String> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::disabled());
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &settings.profile {
            if let Some(file) = &settings.credentials_file {
                let files = EnvConfigFiles::builder()
                    .with_file(EnvConfigFileKind::Credentials, file)
                    .build();
                loader = loader.profile_files(files);
            }
            loader = loader.profile_name(profile);
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(format!(
                "backend {name}: no AWS region: set region in [backend.{name}] or AWS_REGION"
            ));
        }
        let mut builder = aws_sdk_kms::config::Builder::from(&sdk);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(AwsKms {
            name: name.to_string(),
            client: Client::from_conf(builder.build()),
            arns: Default::default(),
        })
    }
}

fn context_map(ctx: &Context) -> Option<HashMap<String, String>> {
    (!ctx.is_empty()).then(|| {
        ctx.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

/// Take a 32-byte plaintext data key out of a KMS response, wiping the SDK's copy.
fn data_key(blob: Option<Blob>) -> Result<DataKey, BackendError> {
    let mut bytes = blob.map(Blob::into_inner).unwrap_or_default();
    let key = <[u8; 32]>::try_from(bytes.as_slice())
        .map(DataKey::from_bytes)
        .map_err(|_| BackendError::Unavailable("KMS returned a data key of the wrong size".into()));
    bytes.zeroize();
    key
}

fn map_err<E, R>(key_id: &str, e: SdkError<E, R>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let code = match &e {
        SdkError::ServiceError(se) => se.err().code(),
        _ => None,
    };
    classify(key_id, code, || format!("KMS: {}", DisplayErrorContext(&e)))
}

/// What a KMS error code means for the proxy. Every code KMS documents for GenerateDataKey,
/// Encrypt, Decrypt and DescribeKey, plus the common AWS errors, is named here; anything else
/// (network failures, timeouts, codes added later) is an outage, never bad data.
///
/// Only `InvalidCiphertextException` and `IncorrectKeyException` blame the ciphertext: KMS
/// authenticated the request, found the key usable and refused the blob (tampered, another
/// encryption context, or made under another key).
pub(crate) fn classify(
    key_id: &str,
    code: Option<&str>,
    detail: impl FnOnce() -> String,
) -> BackendError {
    let key = || key_id.to_string();
    match code.unwrap_or("") {
        "InvalidCiphertextException" | "IncorrectKeyException" => BackendError::InvalidCiphertext,
        // Pending deletion or import: named as the local keyring names them (the client's
        // error says so; the message is KMS's). Disabled, or another state: disabled.
        "KMSInvalidStateException" => {
            let message = detail();
            let state =
                if message.contains("pending deletion") || message.contains("PendingDeletion") {
                    Some("pending_deletion")
                } else if message.contains("pending import") || message.contains("PendingImport") {
                    Some("pending_import")
                } else {
                    None
                };
            match state {
                Some(state) => BackendError::KeyState {
                    key: key(),
                    state,
                    detail: "the AWS KMS key's state allows no use (see DescribeKey)".into(),
                },
                None => BackendError::KeyDisabled(key()),
            }
        }
        "DisabledException" => BackendError::KeyDisabled(key()),
        // An asymmetric or HMAC key configured for envelope encryption.
        "InvalidKeyUsageException" => BackendError::KeyDisabled(key()),
        "NotFoundException" => BackendError::KeyNotFound(key()),
        "AccessDeniedException"
        | "AccessDenied"
        | "InvalidGrantTokenException"
        | "InvalidGrantIdException" => BackendError::AccessDenied(key()),
        // The proxy's credentials, not the data: the chain refreshes expired tokens, so retry.
        "ExpiredTokenException"
        | "ExpiredToken"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "RequestExpired" => BackendError::Credentials(detail()),
        // A request KMS will not take that a retry cannot fix: a key id it will not parse
        // (configuration), a parameter out of range, a dry run.
        "ValidationException"
        | "InvalidArnException"
        | "DryRunOperationException"
        | "UnsupportedOperationException"
        | "CustomKeyStoreInvalidStateException" => BackendError::Refused(detail()),
        // Throttling, KMS internal errors, dependency timeouts, key unavailable (CloudHSM,
        // external key stores), network failures, unknown codes: worth a retry.
        _ => BackendError::Unavailable(detail()),
    }
}

impl AwsKms {
    /// An EDK from a KMS answer. The key id is the ARN KMS used (when it says): unambiguous in
    /// the header and the audit log, even for aliases.
    fn wrapped(&self, asked: &str, used: Option<&str>, blob: Option<&Blob>) -> WrappedKey {
        WrappedKey {
            backend: self.name.clone(),
            key_id: used.unwrap_or(asked).to_string(),
            key_version: 0,
            blob: blob.map(|b| b.as_ref().to_vec()).unwrap_or_default(),
        }
    }
}

#[async_trait]
impl RootKeyProvider for AwsKms {
    fn name(&self) -> &str {
        &self.name
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &Context,
    ) -> Result<GeneratedKey, BackendError> {
        let out = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(context_map(ctx))
            .send()
            .await
            .map_err(|e| map_err(key_id, e))?;
        let wrapped = self.wrapped(key_id, out.key_id(), out.ciphertext_blob());
        self.learn(key_id, &wrapped.key_id);
        let plaintext = data_key(out.plaintext)?;
        Ok(GeneratedKey { plaintext, wrapped })
    }

    async fn wrap_data_key(
        &self,
        key_id: &str,
        key: &DataKey,
        ctx: &Context,
    ) -> Result<WrappedKey, BackendError> {
        let out = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(context_map(ctx))
            .send()
            .await
            .map_err(|e| map_err(key_id, e))?;
        Ok(self.wrapped(key_id, out.key_id(), out.ciphertext_blob()))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &Context,
    ) -> Result<DataKey, BackendError> {
        if wrapped.blob.is_empty() || wrapped.blob.len() > 6144 {
            return Err(BackendError::InvalidCiphertext);
        }
        let out = self
            .client
            .decrypt()
            .key_id(&wrapped.key_id)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .set_encryption_context(context_map(ctx))
            .send()
            .await
            .map_err(|e| map_err(&wrapped.key_id, e))?;
        data_key(out.plaintext)
    }

    /// A key has several names in KMS (alias, key id, ARN); EDKs record the ARN. An alias is
    /// compared by the ARN KMS reported for it ([`resolve_key`](RootKeyProvider::resolve_key)
    /// learns it before any EDK is matched); while it is unknown, no EDK matches (an EDK
    /// naming another key is never sent to KMS under this route's name).
    fn same_key(&self, configured: &str, wrapped_key_id: &str) -> bool {
        if configured == wrapped_key_id || wrapped_key_id.ends_with(&format!(":key/{configured}")) {
            return true;
        }
        self.arns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(configured)
            .is_some_and(|arn| arn == wrapped_key_id)
    }

    /// An alias (`alias/x` or an alias ARN) is looked up once with DescribeKey; its ARN is
    /// kept for the process's life (a re-pointed alias needs a restart, as the data-key cache
    /// does). Errors are the backend's: an outage here fails the request as an outage.
    async fn resolve_key(&self, key_id: &str) -> Result<(), BackendError> {
        if !self.resolved(key_id) {
            self.describe_key(key_id).await?;
        }
        Ok(())
    }

    fn resolved(&self, key_id: &str) -> bool {
        let is_alias = key_id.starts_with("alias/") || key_id.contains(":alias/");
        !is_alias
            || self
                .arns
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(key_id)
    }

    async fn describe_key(&self, key_id: &str) -> Result<KeyDescription, BackendError> {
        let out = self
            .client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| map_err(key_id, e))?;
        let meta = out.key_metadata().ok_or_else(|| {
            BackendError::Unavailable("KMS DescribeKey returned no metadata".into())
        })?;
        if let Some(arn) = meta.arn() {
            self.learn(key_id, arn);
        }
        Ok(KeyDescription {
            key_id: meta.arn().unwrap_or(key_id).to_string(),
            enabled: meta.enabled(),
            current_version: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kms::error::ErrorMetadata;
    use aws_sdk_kms::operation::decrypt::DecryptError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;

    /// A KMS service error with `code`, as the SDK hands it over.
    fn service_error(code: &str) -> SdkError<DecryptError, Response> {
        let err = DecryptError::generic(ErrorMetadata::builder().code(code).message("m").build());
        let raw = Response::new(StatusCode::try_from(400).unwrap(), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    fn kind(code: &str) -> &'static str {
        map_err("arn:aws:kms:eu-west-1:1:key/k", service_error(code)).kind()
    }

    #[test]
    fn only_ciphertext_errors_blame_the_ciphertext() {
        assert_eq!(kind("InvalidCiphertextException"), "invalid_ciphertext");
        assert_eq!(kind("IncorrectKeyException"), "invalid_ciphertext");
        for code in [
            "ExpiredTokenException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "AccessDeniedException",
            "KMSInvalidStateException",
            "DisabledException",
            "NotFoundException",
            "InvalidKeyUsageException",
            "ValidationException",
            "InvalidArnException",
            "ThrottlingException",
            "LimitExceededException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
            "SomethingNewException",
        ] {
            let e = map_err("k", service_error(code));
            assert!(
                !e.proves_invalid(),
                "{code} must not prove the ciphertext bad: {e:?}"
            );
        }
    }

    #[test]
    fn expired_or_unknown_credentials_are_retryable() {
        for code in ["ExpiredTokenException", "UnrecognizedClientException"] {
            let e = map_err("k", service_error(code));
            assert!(matches!(e, BackendError::Credentials(_)), "{code}: {e:?}");
            assert!(e.retryable(), "{code}");
        }
    }

    #[test]
    fn key_states_and_policy_are_named() {
        assert_eq!(kind("AccessDeniedException"), "access_denied");
        assert_eq!(kind("DisabledException"), "key_disabled");
        assert_eq!(kind("KMSInvalidStateException"), "key_disabled");
        // KMS says which state in the message: pending deletion and import are named.
        let e = classify("k", Some("KMSInvalidStateException"), || {
            "arn:aws:kms:us-east-1:123456789012:key/abc is pending deletion.".into()
        });
        assert!(
            matches!(
                e,
                BackendError::KeyState {
                    state: "pending_deletion",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = classify("k", Some("KMSInvalidStateException"), || {
            "key/abc is pending import.".into()
        });
        assert!(
            matches!(
                e,
                BackendError::KeyState {
                    state: "pending_import",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(kind("NotFoundException"), "key_not_found");
        assert_eq!(kind("ValidationException"), "refused");
        for code in [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
        ] {
            assert_eq!(kind(code), "unavailable", "{code}");
            assert!(map_err("k", service_error(code)).retryable(), "{code}");
        }
    }

    #[test]
    fn transport_failures_are_outages() {
        let e: SdkError<DecryptError, Response> =
            SdkError::timeout_error("deadline passed".to_string());
        let e = map_err("k", e);
        assert!(
            matches!(e, BackendError::Unavailable(_)) && e.retryable(),
            "{e:?}"
        );
    }
}
