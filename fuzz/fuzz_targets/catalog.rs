//! The catalog file: `LocalFileStore::load` on the input as the catalog.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use volmgr::fuzzing::{catalog, CatalogFixture};

static FIXTURE: LazyLock<CatalogFixture> =
    LazyLock::new(|| CatalogFixture::new().expect("scratch data directory"));

fuzz_target!(|data: &[u8]| catalog(&FIXTURE, data));
