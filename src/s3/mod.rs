pub mod checksum;
pub mod etag;
pub mod gateway;
pub mod listing;
pub mod offline;
pub mod range;
pub mod sign;
pub mod xml_error;
