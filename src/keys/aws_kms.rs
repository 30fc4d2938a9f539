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
    if let SdkError::ServiceError(se) = &e {
        match se.err().code() {
            Some("NotFoundException") => return BackendError::KeyNotFound(key_id.to_string()),
            Some("DisabledException") | Some("KMSInvalidStateException") => {
                return BackendError::KeyDisabled(key_id.to_string());
            }
            // Bad or missing credentials are configuration, not an outage: no retry.
            Some("AccessDeniedException")
            | Some("UnrecognizedClientException")
            | Some("InvalidSignatureException")
            | Some("ExpiredTokenException") => {
                return BackendError::AccessDenied(key_id.to_string());
            }
            // A key id or ARN KMS will not parse comes from a stored EDK (or a typo): the
            // ciphertext is at fault, and retrying cannot help.
            Some("InvalidCiphertextException")
            | Some("IncorrectKeyException")
            | Some("InvalidKeyUsageException")
            | Some("ValidationException")
            | Some("InvalidArnException") => {
                return BackendError::InvalidCiphertext;
            }
            _ => {}
        }
    }
    // Throttling, internal errors, dependency timeouts, network failures: worth a retry.
    BackendError::Unavailable(format!("KMS: {}", DisplayErrorContext(&e)))
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

    /// A key has several names in KMS (alias, key id, ARN); EDKs record the ARN. An alias whose
    /// ARN this process has not seen yet (startup looks every route key up) is accepted and left
    /// to KMS, which decrypts only with the key that made the ciphertext.
    fn same_key(&self, configured: &str, wrapped_key_id: &str) -> bool {
        if configured == wrapped_key_id || wrapped_key_id.ends_with(&format!(":key/{configured}")) {
            return true;
        }
        match self
            .arns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(configured)
        {
            Some(arn) => arn == wrapped_key_id,
            None => configured.starts_with("alias/"),
        }
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
