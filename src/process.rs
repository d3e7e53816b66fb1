//! Who a process is: the names daemons and `prefetch` commands hold leases and claims
//! under, and what this host can tell of the process such a name points at.
//!
//! A name is `<host> pid <pid> [<boot>.<pidns>.<start>]`: the host and pid tell an
//! operator where the process runs; the bracket makes the name unique to one process
//! on one boot, even across PID namespaces that share a hostname (containers are all
//! pid 1). `boot` is the start of the kernel's boot id, `pidns` the inode of the PID
//! namespace, `start` the process's start time in clock ticks since boot. Within the
//! same boot and PID namespace a holder's liveness is certain (`/proc/<pid>/stat`
//! carries the start time); from elsewhere nothing can be told.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// What a `prefetch` command's names start with, before the process part.
const PREFETCH_COMMAND: &str = "prefetch on ";

/// This process's identity, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    host: String,
    pid: u32,
    /// Boot id, PID namespace and start time; `None` when `/proc` cannot tell them.
    tag: Option<Tag>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tag {
    boot: String,
    pidns: u64,
    start: u64,
}

impl Identity {
    fn of_this_process() -> Identity {
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let pid = std::process::id();
        let tag = (|| {
            Some(Tag {
                boot: boot_id()?,
                pidns: std::fs::metadata("/proc/self/ns/pid").ok()?.ino(),
                start: start_ticks("self")?,
            })
        })();
        Identity { host, pid, tag }
    }

    fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!(
                "{} pid {} [{}.{}.{}]",
                self.host, self.pid, t.boot, t.pidns, t.start
            ),
            // Without /proc the pid alone names us; such a name is never judged gone
            // by another process (see `holder_state`).
            None => format!("{} pid {} [unknown]", self.host, self.pid),
        }
    }

    /// Parses a name made by [`Identity::name`] (without the command prefix).
    fn parse(name: &str) -> Option<Identity> {
        let (host, rest) = name.rsplit_once(" pid ")?;
        let (pid, tag) = rest.split_once(" [")?;
        let tag = tag.strip_suffix(']')?;
        let pid = pid.parse().ok()?;
        let tag = match tag {
            "unknown" => None,
            t => {
                let mut parts = t.split('.');
                let tag = Tag {
                    boot: parts.next()?.to_owned(),
                    pidns: parts.next()?.parse().ok()?,
                    start: parts.next()?.parse().ok()?,
                };
                if parts.next().is_some() {
                    return None;
                }
                Some(tag)
            }
        };
        Some(Identity {
            host: host.to_owned(),
            pid,
            tag,
        })
    }
}

fn this_process() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(Identity::of_this_process)
}

/// The first 8 hex digits of the kernel's boot id: enough to tell boots apart.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let short: String = id.trim().chars().filter(|c| *c != '-').take(8).collect();
    (short.len() == 8).then_some(short)
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted after
/// its last `)`.
fn start_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_comm) = stat.rsplit_once(')')?;
    // After the command name: state is field 3, so start time (22) is the 20th.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The name a daemon holds its lease and its queue claims under.
pub(crate) fn holder_name() -> String {
    this_process().name()
}

/// The name a `glance-cached prefetch` command holds its queue claims under.
pub(crate) fn prefetch_command_holder_name() -> String {
    format!("{PREFETCH_COMMAND}{}", holder_name())
}

/// What this host can tell of the process a holder name (a daemon's or a `prefetch`
/// command's) points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HolderState {
    /// That very process is running (same boot, same PID namespace, same start time).
    Running,
    /// It ran in this PID namespace on this boot and no longer does (its pid is free or
    /// names a process started later).
    Gone,
    /// Another host's, another boot's or another PID namespace's process, or a name
    /// not of our making: nothing can be told.
    Unknown,
}

/// Judges a holder name. Names of older versions (`<host> pid N`, no bracket) carry no
/// start time, so they are `Unknown`: such a lease expires by itself.
pub(crate) fn holder_state(holder: &str) -> HolderState {
    let name = holder.strip_prefix(PREFETCH_COMMAND).unwrap_or(holder);
    let Some(theirs) = Identity::parse(name) else {
        return HolderState::Unknown;
    };
    let ours = this_process();
    let (Some(their_tag), Some(our_tag)) = (&theirs.tag, &ours.tag) else {
        return HolderState::Unknown;
    };
    if theirs.host != ours.host
        || their_tag.boot != our_tag.boot
        || their_tag.pidns != our_tag.pidns
    {
        return HolderState::Unknown;
    }
    match start_ticks(&theirs.pid.to_string()) {
        Some(start) if start == their_tag.start => HolderState::Running,
        // No such pid, or a process that started later under the same pid.
        _ => HolderState::Gone,
    }
}

/// Whether the lease holder may be a predecessor of this process that died where this
/// host cannot look (a container restarted in a new PID namespace, under the same
/// hostname and kernel): the only proof left is that it stops renewing.
pub(crate) fn may_be_predecessor(holder: &str) -> bool {
    let Some(theirs) = Identity::parse(holder) else {
        return false;
    };
    let ours = this_process();
    match (&theirs.tag, &ours.tag) {
        (Some(t), Some(o)) => theirs.host == ours.host && t.boot == o.boot,
        _ => false,
    }
}

/// Whether a queue claim held by `holder` must stay while this process, holding claims
/// as `own`, runs: ours, a running process's, or one this host cannot check.
pub(crate) fn claim_may_be_live(own: &str, holder: &str) -> bool {
    holder == own || holder_state(holder) != HolderState::Gone
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name a process of this boot and namespace with `pid` and `start` would hold.
    fn local(pid: u32, start: u64) -> String {
        let mut id = this_process().clone();
        id.pid = pid;
        if let Some(tag) = id.tag.as_mut() {
            tag.start = start;
        }
        id.name()
    }

    fn local_process(pid: u32) -> String {
        local(pid, start_ticks(&pid.to_string()).unwrap_or(0))
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_unknown() {
        let own = holder_name();
        assert_eq!(Identity::parse(&own).as_ref(), Some(this_process()));
        assert!(
            this_process().tag.is_some(),
            "/proc tells our identity here"
        );
        assert_eq!(
            holder_state("elsewhere.example pid 1 [0123abcd.1.2]"),
            HolderState::Unknown
        );
        assert_eq!(holder_state("worker-3"), HolderState::Unknown);
        // A name from an older version: no start time, so nothing can be told.
        assert_eq!(
            holder_state(&format!("{} pid 1", this_process().host)),
            HolderState::Unknown
        );
        assert_eq!(holder_state(&format!("{own}x")), HolderState::Unknown);
    }

    #[test]
    fn holders_are_told_apart_by_start_time_boot_and_namespace() {
        // Ourselves, and a live process of this namespace.
        assert_eq!(holder_state(&holder_name()), HolderState::Running);
        assert_eq!(
            holder_state(&prefetch_command_holder_name()),
            HolderState::Running
        );
        // Our pid with another start time: a predecessor that was pid 1 before us.
        let own_pid = std::process::id();
        let own_start = this_process().tag.as_ref().map_or(0, |t| t.start);
        assert_eq!(
            holder_state(&local(own_pid, own_start + 1)),
            HolderState::Gone
        );
        // A process that has exited.
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let exited_pid = exited.id();
        let exited_name = local_process(exited_pid);
        exited.wait().unwrap();
        assert_eq!(holder_state(&exited_name), HolderState::Gone);
        // A running process: known by its start time whatever program it runs.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let running = holder_state(&local_process(other.id()));
        let reused = holder_state(&local(other.id(), 1));
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(running, HolderState::Running);
        assert_eq!(reused, HolderState::Gone);
        // The same pid and start time in another PID namespace or boot: unknown.
        let mut id = this_process().clone();
        if let Some(tag) = id.tag.as_mut() {
            tag.pidns += 1;
        }
        assert_eq!(holder_state(&id.name()), HolderState::Unknown);
        assert!(may_be_predecessor(&id.name()));
        if let Some(tag) = id.tag.as_mut() {
            tag.boot = "ffffffff".into();
        }
        assert_eq!(holder_state(&id.name()), HolderState::Unknown);
        assert!(!may_be_predecessor(&id.name()));
        // Ours, and live processes, are kept by claim recovery; gone ones are not.
        let own = holder_name();
        assert!(claim_may_be_live(&own, &own));
        assert!(claim_may_be_live(
            &own,
            "elsewhere.example pid 1 [0123abcd.1.2]"
        ));
        assert!(!claim_may_be_live(&own, &exited_name));
    }
}
