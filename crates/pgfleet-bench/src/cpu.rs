//! CPU time of this process and of the PostgreSQL server, from /proc.

/// utime + stime of a process, in clock ticks, from /proc; with
/// `reaped_children`, also cutime + cstime: the CPU of its children that
/// exited and were waited for.
pub fn cpu_ticks_of(pid: &str, reaped_children: bool) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15, cutime
    // 16, cstime 17.
    let get = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let own = get(14) + get(15);
    if reaped_children {
        own + get(16) + get(17)
    } else {
        own
    }
}

pub fn cpu_ticks_self() -> u64 {
    cpu_ticks_of("self", false)
}

/// CPU of the postmaster and all its children (the backends), including
/// backends that have exited since: the postmaster reaps them, and their
/// ticks move to its children's times. A backend reaped between reading the
/// postmaster and scanning the backends would be missed, so the scan is
/// repeated (a few times at most) until the postmaster reads the same
/// before and after it.
pub fn cpu_ticks_server(postmaster: u32) -> u64 {
    let pid = postmaster.to_string();
    let mut total = 0;
    for _ in 0..5 {
        let before = cpu_ticks_of(&pid, true);
        total = before + cpu_ticks_backends(postmaster);
        if cpu_ticks_of(&pid, true) == before {
            break;
        }
    }
    total
}

/// CPU of the postmaster's live children.
pub fn cpu_ticks_backends(postmaster: u32) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                total += cpu_ticks_of(pid, false);
            }
        }
    }
    total
}
