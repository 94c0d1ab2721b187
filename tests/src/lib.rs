//! Support code for the system tests.
