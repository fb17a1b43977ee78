pub use jiff;
