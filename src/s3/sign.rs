//! Signing requests to the upstream S3 endpoint with the proxy's own credentials (aws-sigv4).
//!
//! The client's signature ends at the proxy (s3s verified it); every upstream request is signed
//! anew. Settings that matter for S3: the path is signed as sent (single percent-encoding, no
//! normalization: keys with `//`, `%` or `+` survive), and the payload is `UNSIGNED-PAYLOAD`
//! (bodies are streamed encrypted; hashing them first would mean buffering).

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_sigv4::sign::v4;
use zeroize::Zeroizing;

/// The proxy's credentials for one upstream, built once (no per-request copies of the secret).
pub struct UpstreamCredentials {
    access_key_id: String,
    credentials: Credentials,
}

impl std::fmt::Debug for UpstreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamCredentials({}, [SENSITIVE])",
            self.access_key_id
        )
    }
}

impl UpstreamCredentials {
    pub fn new(access_key_id: String, secret_access_key: Zeroizing<String>) -> Self {
        let credentials = Credentials::new(
            access_key_id.clone(),
            secret_access_key.to_string(),
            None,
            None,
            "envelope-proxy",
        );
        UpstreamCredentials {
            access_key_id,
            credentials,
        }
    }
}

/// Sign `req` in place for service `s3` in `region`.
pub fn sign_request<B>(
    req: &mut http::Request<B>,
    creds: &UpstreamCredentials,
    region: &str,
) -> Result<(), String> {
    // An aws-chunked body with trailers (a sealed upload, see `upstream_body`) says so; any
    // other body is sent unsigned.
    let trailer = req
        .headers()
        .get("x-amz-content-sha256")
        .is_some_and(|v| v == super::upstream_body::STREAMING_UNSIGNED_TRAILER);
    if !trailer {
        req.headers_mut().insert(
            "x-amz-content-sha256",
            http::HeaderValue::from_static("UNSIGNED-PAYLOAD"),
        );
    }
    let identity = creds.credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let uri = req.uri().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        if trailer {
            SignableBody::StreamingUnsignedPayloadTrailer
        } else {
            SignableBody::UnsignedPayload
        },
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}
