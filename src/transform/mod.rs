//! Body transforms. The set is closed (JSON fields today; S3 object bodies next), so each is a
//! module with the same verbs rather than a trait: `seal_*` on the way to storage, `open_*` on
//! the way back.

pub mod field_path;
pub mod json_fields;
pub mod json_scan;
pub mod mask;
pub mod s3_object;
pub mod strict_json;
