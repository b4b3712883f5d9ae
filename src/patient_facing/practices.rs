//! Where a patient's GP practice comes from when the token does not say: a [`PracticeSource`]. The one here reads
//! a file of `nhs_number,ods` lines; a PDS FHIR client (the national answer) would be another source behind the
//! same trait.

use std::collections::HashMap;
use std::path::Path;

use crate::audit::patients::Check;
use crate::ids::OdsCode;

/// Largest practices file read.
const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// A lookup of a patient's registered GP practice.
pub trait PracticeSource: std::fmt::Debug + Send + Sync {
    /// The ODS code of the practice `nhs_number` (ten valid digits) is registered at, if known.
    fn practice(&self, nhs_number: &str) -> Option<OdsCode>;
}

/// `patient_facing.practices`: one `nhs_number,ods` per line; blank lines and lines starting with `#` are
/// skipped; spaces around either value are ignored.
#[derive(Debug, Default)]
pub struct PracticeFile {
    by_number: HashMap<u64, OdsCode>,
}

impl PracticeFile {
    /// Reads `path`. Errors name the file and the first bad line: a number that is not ten digits with a valid
    /// check digit, an ODS code that is not one, or a number listed twice with two practices.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = super::read_bounded(path, MAX_FILE_BYTES)?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        Self::parse(text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut by_number = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| format!("line {}: {what}", n + 1);
            let (number, ods) = line
                .split_once(',')
                .ok_or_else(|| bad("not \"nhs_number,ods\""))?;
            let number = number.trim();
            if Check::of(number) != Check::Valid {
                return Err(bad("not an NHS number (ten digits, valid check digit)"));
            }
            let ods = OdsCode::parse(ods.trim()).ok_or_else(|| bad("not an ODS code"))?;
            let key: u64 = number.parse().map_err(|_| bad("not an NHS number"))?;
            if let Some(before) = by_number.insert(key, ods.clone())
                && before != ods
            {
                return Err(bad("the number is listed twice with two practices"));
            }
        }
        Ok(Self { by_number })
    }

    /// Numbers listed.
    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }
}

impl PracticeSource for PracticeFile {
    fn practice(&self, nhs_number: &str) -> Option<OdsCode> {
        self.by_number.get(&nhs_number.parse().ok()?).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::{PracticeFile, PracticeSource};

    #[test]
    fn lines_are_read_strictly() {
        let file =
            PracticeFile::parse("# patients\n9000000009, B82617\n\n9000000017,B82618\n").unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(file.practice("9000000009").unwrap().as_str(), "B82617");
        assert!(file.practice("9000000025").is_none());
        for bad in [
            "9000000008,B82617",
            "900000000,B82617",
            "9000000009",
            "9000000009,B8 2617",
            "9000000009,B82617\n9000000009,B82618",
        ] {
            assert!(PracticeFile::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
