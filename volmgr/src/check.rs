//! What a catalog's records may say: checked when the catalog is read, not only when written.
//!
//! A catalog whose checksums are right can still be wrong: written by a buggy or older
//! blockd, edited by hand, or crafted by someone who can write to the data directory. So every
//! record is held to the rules `volume create` applies, and every component file must name an
//! entry *inside* the volumes directory. What happens to a catalog that breaks a rule:
//!
//! | problem | effect |
//! |---|---|
//! | name or size that `volume create` refuses | that volume is unavailable |
//! | not exactly one component, or an unknown device | that volume is unavailable |
//! | component file that is not one plain file name (`..`, `/`, an absolute path, NUL) | that volume is unavailable |
//! | component file that is a symlink, missing, not a regular file, unreadable, or shorter than the volume (checked on opening, in [`crate::manager`]) | that volume is unavailable |
//! | two records with one name | that name is unavailable (neither record is served) |
//! | two records with one id, or on one file | each of those volumes is unavailable |
//! | devices table without the local device, or with a device id twice | start-up is refused |
//! | `next_volume_id` not above every id | raised in memory, with a warning (no volume is at risk: ids are not file names) |
//!
//! The rule: a problem that belongs to one record (or one name) makes only that volume
//! unavailable, listed with its reason, and every other volume is served; only a problem with
//! the catalog as a whole refuses start-up. An unavailable volume is never opened, its file is
//! never written, and `volume delete` removes its record (and its file only when the name is
//! plain and no other record uses it).

use std::collections::{BTreeMap, HashSet};

use crate::catalog::Catalog;
use crate::error::Error;
use crate::files::is_plain_file_name;

/// Volume sizes are whole 512-byte sectors: the NBD minimum block size we advertise, and what
/// every client (the Linux kernel above all) assumes.
pub const SECTOR_BYTES: u64 = 512;
/// Largest volume: 1 PiB. Keeps every offset far inside `i64` (what `lseek`/`fallocate` take)
/// and is above what one local filesystem file can hold anyway.
pub const VOLUME_MAX_BYTES: u64 = 1 << 50;
/// Longest volume name, in bytes; names are also NBD export names (which allow 4096).
pub const VOLUME_NAME_MAX: usize = 64;
/// The id of this node's own device in the devices table.
pub const LOCAL_DEVICE: u32 = 0;

/// Checks a volume name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > VOLUME_NAME_MAX || !ok_start || !ok_chars {
        return Err(Error::Invalid(format!(
            "invalid volume name {name:?}: use 1 to {VOLUME_NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a volume size.
pub fn validate_size(size_bytes: u64) -> Result<(), Error> {
    if size_bytes == 0 {
        return Err(Error::Invalid(
            "volume size must be greater than zero".into(),
        ));
    }
    if !size_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(Error::Invalid(format!(
            "volume size {size_bytes} is not a multiple of {SECTOR_BYTES} bytes; round it to {}",
            size_bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES
        )));
    }
    if size_bytes > VOLUME_MAX_BYTES {
        return Err(Error::Invalid(format!(
            "volume size {size_bytes} exceeds the limit of {VOLUME_MAX_BYTES} bytes (1 PiB)"
        )));
    }
    Ok(())
}

/// Checks `catalog`'s records. `Err` says why start-up must be refused; `Ok` maps the index
/// of each record that must not be served to why. Raises `next_volume_id` if it is too low.
pub(crate) fn check_catalog(catalog: &mut Catalog) -> Result<BTreeMap<usize, String>, String> {
    let mut device_ids = HashSet::new();
    for device in &catalog.devices {
        if !device_ids.insert(device.id) {
            return Err(format!("device id {} appears twice", device.id));
        }
    }
    if !device_ids.contains(&LOCAL_DEVICE) {
        return Err(format!(
            "no local device (id {LOCAL_DEVICE}) in the devices table"
        ));
    }
    let mut bad: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, rec) in catalog.volumes.iter().enumerate() {
        let why = bad.entry(i).or_default();
        if let Err(e) = validate_name(&rec.name) {
            why.push(e.to_string());
        }
        if let Err(e) = validate_size(rec.size_bytes) {
            why.push(e.to_string());
        }
        if rec.components.len() != 1 {
            why.push(format!(
                "{} components; a plain volume has exactly one",
                rec.components.len()
            ));
        }
        for c in &rec.components {
            if !device_ids.contains(&c.device) {
                why.push(format!("component on unknown device {}", c.device));
            }
            if !is_plain_file_name(&c.file) {
                why.push(format!(
                    "component file {:?} is not a plain file name in the volumes directory (it could resolve outside the data directory)",
                    c.file
                ));
            }
        }
    }
    let volumes = &catalog.volumes;
    let others = |i: usize, same: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..volumes.len())
            .filter(|&j| j != i && same(j))
            .map(|j| format!("{:?} (id {})", volumes[j].name, volumes[j].id))
            .collect()
    };
    for (i, rec) in volumes.iter().enumerate() {
        let why = bad.entry(i).or_default();
        let same_name = others(i, &|j| volumes[j].name == rec.name);
        if !same_name.is_empty() {
            why.push(format!(
                "{} catalog records are named {:?}; neither is served",
                same_name.len() + 1,
                rec.name
            ));
        }
        let same_id = others(i, &|j| volumes[j].id == rec.id);
        if !same_id.is_empty() {
            why.push(format!(
                "id {} is also the id of {}",
                rec.id,
                same_id.join(", ")
            ));
        }
        for c in &rec.components {
            let sharing = others(i, &|j| {
                volumes[j]
                    .components
                    .iter()
                    .any(|o| o.device == c.device && o.file == c.file)
            });
            if !sharing.is_empty() {
                why.push(format!(
                    "file {:?} is also the file of {}",
                    c.file,
                    sharing.join(", ")
                ));
            }
        }
    }
    let top = volumes.iter().map(|r| r.id).max().unwrap_or(0);
    if catalog.next_volume_id <= top {
        tracing::warn!(
            next_volume_id = catalog.next_volume_id,
            highest_id = top,
            "catalog's next volume id is not above every id; raised"
        );
        catalog.next_volume_id = top.saturating_add(1);
    }
    Ok(bad
        .into_iter()
        .filter(|(_, why)| !why.is_empty())
        .map(|(i, why)| (i, why.join("; ")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ComponentRecord, DeviceRecord, Layout, VolumeRecord};
    use raid::CacheMode;

    fn record(id: u64, name: &str, file: &str) -> VolumeRecord {
        VolumeRecord {
            id,
            name: name.into(),
            size_bytes: 1 << 20,
            read_only: false,
            cache: CacheMode::None,
            layout: Layout::Plain,
            components: vec![ComponentRecord {
                device: LOCAL_DEVICE,
                file: file.into(),
            }],
            created_unix: 0,
        }
    }

    fn catalog(volumes: Vec<VolumeRecord>) -> Catalog {
        Catalog {
            generation: 1,
            next_volume_id: 100,
            devices: vec![DeviceRecord {
                id: LOCAL_DEVICE,
                server: "local".into(),
                path: "/d".into(),
            }],
            volumes,
        }
    }

    #[test]
    fn good_records_pass() {
        let mut cat = catalog(vec![record(1, "a", "f1"), record(2, "b", "f2")]);
        assert!(check_catalog(&mut cat).unwrap().is_empty());
    }

    #[test]
    fn each_bad_record_is_attributed_to_its_volume_only() {
        let mut big = record(4, "big", "f4");
        big.size_bytes = 1000;
        let mut two = record(7, "two", "f7");
        two.components.push(ComponentRecord {
            device: 9,
            file: "f7b".into(),
        });
        let mut cat = catalog(vec![
            record(1, "ok", "f1"),
            record(2, "up", "../escape"),
            record(3, "abs", "/etc/shadow"),
            big,
            record(5, "bad name", "f5"),
            record(6, "dup", "f6"),
            record(60, "dup", "f60"),
            two,
            record(8, "same-id-a", "f8"),
            record(8, "same-id-b", "f8b"),
            record(9, "share-a", "shared"),
            record(10, "share-b", "shared"),
        ]);
        let bad = check_catalog(&mut cat).unwrap();
        let why = |name: &str| -> Vec<&String> {
            cat.volumes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.name == name)
                .filter_map(|(i, _)| bad.get(&i))
                .collect()
        };
        assert!(why("ok").is_empty());
        assert!(why("up")[0].contains("outside the data directory"));
        assert!(why("abs")[0].contains("outside the data directory"));
        assert!(why("big")[0].contains("multiple of 512"));
        assert!(why("bad name")[0].contains("invalid volume name"));
        assert_eq!(why("dup").len(), 2);
        assert!(why("dup")[0].contains("2 catalog records are named"));
        assert!(why("two")[0].contains("2 components") && why("two")[0].contains("device 9"));
        assert!(why("same-id-a")[0].contains("id 8 is also the id of \"same-id-b\""));
        assert!(why("share-b")[0].contains("also the file of \"share-a\""));
        assert_eq!(bad.len(), cat.volumes.len() - 1);
    }

    #[test]
    fn catalog_wide_problems_refuse() {
        let mut cat = catalog(vec![]);
        cat.devices.push(cat.devices[0].clone());
        assert!(check_catalog(&mut cat)
            .unwrap_err()
            .contains("appears twice"));
        let mut cat = catalog(vec![]);
        cat.devices[0].id = 3;
        assert!(check_catalog(&mut cat)
            .unwrap_err()
            .contains("no local device"));
    }

    #[test]
    fn a_low_next_id_is_raised() {
        let mut cat = catalog(vec![record(150, "a", "f")]);
        check_catalog(&mut cat).unwrap();
        assert_eq!(cat.next_volume_id, 151);
    }
}
