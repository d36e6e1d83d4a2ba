//! Leak detection (`leak_threshold`): a connection held longer than the
//! threshold is reported while it is still held — with the place it was
//! taken — on the maintenance tick, counted once in `leaks_reported`, and
//! noted again when it finally comes back. (Reported only at its return, a
//! connection that never returns would never be reported.)

use std::collections::HashMap;
use std::panic::Location;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::stats::Counters;

/// The connections held now, when `leak_threshold` is set.
#[derive(Default)]
pub(crate) struct Checkouts {
    held: Mutex<HashMap<u64, Checkout>>,
}

struct Checkout {
    since: Instant,
    location: &'static Location<'static>,
    reported: bool,
}

impl Checkouts {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Checkout>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection `id` was handed out at `since` to the caller at
    /// `location`.
    pub(crate) fn taken(&self, id: u64, since: Instant, location: &'static Location<'static>) {
        self.lock().insert(
            id,
            Checkout {
                since,
                location,
                reported: false,
            },
        );
    }

    /// Connection `id` left its caller at `now` (returned, or taken into
    /// shared mode): reported now if it was held past `threshold` and not
    /// reported yet, noted if it was.
    pub(crate) fn returned(
        &self,
        id: u64,
        now: Instant,
        threshold: Duration,
        label: &str,
        counters: &Counters,
    ) {
        let Some(checkout) = self.lock().remove(&id) else {
            return;
        };
        let held = now.saturating_duration_since(checkout.since);
        if checkout.reported {
            tracing::info!(
                pool = %label,
                held = %humantime::format_duration(held),
                taken_at = %checkout.location,
                "a connection held longer than leak_threshold came back"
            );
        } else if held >= threshold {
            report(label, held, checkout.location, counters);
        }
    }

    /// Reports every connection held longer than `threshold` at `now` that
    /// was not reported yet.
    pub(crate) fn scan(&self, now: Instant, threshold: Duration, label: &str, counters: &Counters) {
        let mut leaked = Vec::new();
        for checkout in self.lock().values_mut() {
            let held = now.saturating_duration_since(checkout.since);
            if !checkout.reported && held >= threshold {
                checkout.reported = true;
                leaked.push((held, checkout.location));
            }
        }
        for (held, location) in leaked {
            report(label, held, location, counters);
        }
    }
}

fn report(label: &str, held: Duration, location: &'static Location<'static>, counters: &Counters) {
    counters.leaks_reported.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        pool = %label,
        held = %humantime::format_duration(held),
        taken_at = %location,
        "connection held longer than leak_threshold (still held)"
    );
}
