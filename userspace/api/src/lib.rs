//! skiff-api: the pure API model logic the apiserver is built from (no I/O): the served
//! resources and discovery ([`registry`]), `metav1.Status` errors ([`status`]), decoding checks,
//! defaulting and validation ([`admission`]), Table output ([`table`]), OpenAPI v3 documents
//! ([`openapi`]), the three patch engines ([`patch`]) and label/field selectors ([`selector`]).
pub mod admission;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod selector;
pub mod status;
pub mod table;
