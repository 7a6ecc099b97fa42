//! End-to-end tests (being written this session).
