//! The clock and the time formats the crate writes: Unix seconds, RFC 3339 with microseconds (every audit record
//! is stamped) and with seconds (certificate and CRL dates in messages). A leaf: it imports nothing from the crate.

use std::fmt;

/// Unix seconds now (0 if the clock is before 1970).
pub(crate) fn unix_now() -> i64 {
    unix_seconds(std::time::SystemTime::now())
}

/// A time as Unix seconds (0 before the epoch).
pub(crate) fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The current time as RFC 3339 with microseconds, UTC.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// Unix seconds as RFC 3339 (`2026-12-07T05:30:00Z`), or the number itself when out of range: for messages
/// that name a certificate's or CRL's dates.
pub(crate) fn rfc3339_seconds(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `t` (UTC) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    Timestamp::of(t).as_str().to_owned()
}

/// A time (UTC) as RFC 3339 with microseconds, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, held inline and written digit by
/// digit: every audit record is stamped, and the general formatter cost a microsecond a record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timestamp([u8; 27]);

impl Timestamp {
    /// Now. The calendar part (to the second) is worked out once a second on each thread and kept; within the
    /// second only the microseconds are written (two records a request are stamped).
    pub(crate) fn now() -> Self {
        thread_local! {
            /// The Unix second last stamped on this thread, and its stamp.
            static SECOND: std::cell::Cell<Option<(u64, Timestamp)>> = const { std::cell::Cell::new(None) };
        }
        let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return Self::of(time::OffsetDateTime::now_utc());
        };
        let (secs, micros) = (since.as_secs(), since.subsec_micros());
        let kept = SECOND.with(|second| match second.get() {
            Some((at, stamp)) if at == secs => Some(stamp),
            _ => {
                let stamp = i64::try_from(secs)
                    .ok()
                    .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                    .map(Self::of)?;
                second.set(Some((secs, stamp)));
                Some(stamp)
            }
        });
        match kept {
            Some(mut stamp) => {
                digits(&mut stamp.0[20..26], micros);
                stamp
            }
            None => Self::of(time::OffsetDateTime::now_utc()),
        }
    }

    pub(crate) fn of(t: time::OffsetDateTime) -> Self {
        let (h, m, sec, micro) = t.to_hms_micro();
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        digits(&mut out[0..4], t.year().clamp(0, 9999) as u32);
        digits(&mut out[5..7], u32::from(u8::from(t.month())));
        digits(&mut out[8..10], u32::from(t.day()));
        digits(&mut out[11..13], u32::from(h));
        digits(&mut out[14..16], u32::from(m));
        digits(&mut out[17..19], u32::from(sec));
        digits(&mut out[20..26], micro);
        Self(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Digits and ASCII separators only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Writes `n` into `out` as decimal digits, zero-padded on the left to `out`'s length (higher digits dropped).
fn digits(out: &mut [u8], n: u32) {
    let mut n = n;
    for place in out.iter_mut().rev() {
        *place = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written stamp is what the general formatter writes, for any instant of these years.
    #[test]
    fn timestamps_match_the_formatter() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut t = time::OffsetDateTime::from_unix_timestamp(0).unwrap();
        let step = time::Duration::seconds(86_399) + time::Duration::microseconds(987_654);
        while t.year() < 2100 {
            assert_eq!(rfc3339(t), t.format(&format).unwrap());
            t += step;
        }
        let now = now_rfc3339();
        assert_eq!(now.len(), 27, "{now}");
    }

    /// A stamp made from the second kept on the thread is the formatter's stamp of the same instant, across
    /// second boundaries: each stamp lies between the clock read before it and the one after it.
    #[test]
    fn stamps_from_the_kept_second_agree_with_the_clock() {
        let started = std::time::Instant::now();
        let mut stamps = 0;
        while started.elapsed() < std::time::Duration::from_millis(1_050) {
            let before = rfc3339(time::OffsetDateTime::now_utc());
            let stamp = Timestamp::now();
            let after = rfc3339(time::OffsetDateTime::now_utc());
            // Fixed-width text with the most significant field first: text order is time order.
            assert!(
                before.as_str() <= stamp.as_str() && stamp.as_str() <= after.as_str(),
                "{before} {stamp:?} {after}"
            );
            stamps += 1;
        }
        assert!(stamps > 1000, "{stamps}");
    }
}
