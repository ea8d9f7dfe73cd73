//! Read consistency and the positions that make read-your-writes work on replicas.
//!
//! A committed write has a GTID (MariaDB: `domain-server-sequence`, e.g. `0-1-42`). A replica
//! that has applied that GTID holds the write. A [`Watermark`] names the database of the write
//! and its GTID: a read that must see the write waits until the chosen replica has applied it.
//! A [`Watermark`] is also what a client gets back as its consistency token (`o0:0-1-42`).
//!
//! GTIDs of one domain are ordered by their sequence number (the servers run in GTID strict
//! mode, so a replica applies a domain's transactions in that order); GTIDs of different
//! domains are not comparable.

use std::fmt;

/// What a read needs to see (`?consistency=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Any healthy replica, however far behind (within the rotation's lag bound).
    Eventual,
    /// Read-your-writes: every write acknowledged before the read (by watermark or token).
    #[default]
    Session,
    /// The primary.
    Strong,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Consistency> {
        match s {
            "eventual" => Some(Consistency::Eventual),
            "session" => Some(Consistency::Session),
            "strong" => Some(Consistency::Strong),
            _ => None,
        }
    }
}

/// One MariaDB GTID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl Gtid {
    /// `domain-server-seq`, decimal, nothing else.
    pub fn parse(s: &str) -> Option<Gtid> {
        fn num(p: Option<&str>) -> Option<&str> {
            p.filter(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
        }
        let mut parts = s.split('-');
        let domain = num(parts.next())?.parse().ok()?;
        let server = num(parts.next())?.parse().ok()?;
        let seq = num(parts.next())?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Gtid { domain, server, seq })
    }

    /// Whether `self` is at or after `other` in the same domain (`None`: other domains).
    pub fn covers(&self, other: &Gtid) -> Option<bool> {
        (self.domain == other.domain).then_some(self.seq >= other.seq)
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// A server's GTID position (`@@gtid_binlog_pos`, `@@gtid_slave_pos`): the last GTID of each
/// domain, comma-separated; empty when nothing was logged or applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidPosition(Vec<Gtid>);

impl GtidPosition {
    pub fn parse(s: &str) -> Option<GtidPosition> {
        let s = s.trim();
        if s.is_empty() {
            return Some(GtidPosition::default());
        }
        let mut gtids = s
            .split(',')
            .map(|g| Gtid::parse(g.trim()))
            .collect::<Option<Vec<_>>>()?;
        gtids.sort_by_key(|g| g.domain);
        gtids.dedup_by_key(|g| g.domain);
        Some(GtidPosition(gtids))
    }

    /// Whether a server at this position has applied `gtid`.
    pub fn includes(&self, gtid: &Gtid) -> bool {
        self.0.iter().any(|g| g.covers(gtid) == Some(true))
    }

    /// Whether a server at this position has applied everything of `other`.
    pub fn includes_all(&self, other: &GtidPosition) -> bool {
        other.0.iter().all(|g| self.includes(g))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The last GTID of each domain.
    pub fn gtids(&self) -> &[Gtid] {
        &self.0
    }

    /// Records that the server has applied `gtid` (and so everything of its domain before it).
    pub fn raise(&mut self, gtid: Gtid) {
        match self.0.iter_mut().find(|g| g.domain == gtid.domain) {
            Some(g) if g.seq < gtid.seq => *g = gtid,
            Some(_) => {}
            None => {
                self.0.push(gtid);
                self.0.sort_by_key(|g| g.domain);
            }
        }
    }
}

impl fmt::Display for GtidPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

/// Which database a watermark is about: a shard database of the shard map (by its index) or
/// the commerce database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatabaseRef {
    Shards(u16),
    Commerce,
    /// The archive of old orders. It has no replicas, so no watermark or token is ever made
    /// for it (and none is accepted).
    Archive,
}

/// The position a read must reach to see a write: its database and its GTID. Written as a
/// consistency token, `o<index>:<gtid>` for a shard database, `c:<gtid>` for commerce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Watermark {
    pub database: DatabaseRef,
    pub gtid: Gtid,
}

/// The longest token accepted: `o65535:` and three 20-digit numbers fit well within it.
const MAX_TOKEN_LEN: usize = 80;

impl Watermark {
    /// A consistency token as this service writes it; anything else is `None`.
    pub fn parse(token: &str) -> Option<Watermark> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let (db, gtid) = token.split_once(':')?;
        let database = match db {
            "c" => DatabaseRef::Commerce,
            _ => {
                let n = db.strip_prefix('o')?;
                if n.is_empty() || n.len() > 5 || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                DatabaseRef::Shards(n.parse().ok()?)
            }
        };
        Some(Watermark {
            database,
            gtid: Gtid::parse(gtid)?,
        })
    }

    /// The later of two watermarks of the same database and domain; across domains (a
    /// primary replaced by one logging another domain) the newer one, `later`, wins.
    pub fn max(self, later: Watermark) -> Watermark {
        if self.database == later.database && self.gtid.covers(&later.gtid) == Some(true) {
            self
        } else {
            later
        }
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.database {
            DatabaseRef::Shards(i) => write!(f, "o{i}:{}", self.gtid),
            DatabaseRef::Commerce => write!(f, "c:{}", self.gtid),
            DatabaseRef::Archive => write!(f, "a:{}", self.gtid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtids_and_positions_parse_strictly() {
        let g = Gtid::parse("0-1-42").unwrap();
        assert_eq!((g.domain, g.server, g.seq), (0, 1, 42));
        assert_eq!(g.to_string(), "0-1-42");
        for bad in [
            "",
            "0-1",
            "0-1-2-3",
            "a-1-2",
            "0--2",
            "-1-2",
            "0-1-+2",
            "0-1-99999999999999999999999",
        ] {
            assert_eq!(Gtid::parse(bad), None, "{bad:?}");
        }
        let p = GtidPosition::parse("1-2-7,0-1-42").unwrap();
        assert_eq!(p.to_string(), "0-1-42,1-2-7");
        assert!(p.includes(&Gtid::parse("0-3-41").unwrap()));
        assert!(p.includes(&Gtid::parse("0-1-42").unwrap()));
        assert!(!p.includes(&Gtid::parse("0-1-43").unwrap()));
        assert!(
            !p.includes(&Gtid::parse("2-1-1").unwrap()),
            "another domain is not included"
        );
        assert!(GtidPosition::parse("").unwrap().is_empty());
        assert!(p.includes_all(&GtidPosition::parse("0-1-40").unwrap()));
        assert!(!GtidPosition::parse("0-1-40").unwrap().includes_all(&p));
        assert_eq!(GtidPosition::parse("0-1-x"), None);
        let mut q = GtidPosition::parse("0-1-40").unwrap();
        q.raise(Gtid::parse("0-1-42").unwrap());
        q.raise(Gtid::parse("0-1-41").unwrap());
        q.raise(Gtid::parse("1-2-7").unwrap());
        assert_eq!(q, p, "raised to the later GTID of each domain");
    }

    #[test]
    fn tokens_round_trip_and_refuse_anything_else() {
        for t in ["o0:0-1-42", "o17:3-9-1", "c:0-1-5"] {
            assert_eq!(Watermark::parse(t).unwrap().to_string(), t);
        }
        for bad in [
            "",
            "o:0-1-1",
            "x0:0-1-1",
            "o0",
            "o0:0-1",
            "o99999:0-1-1",
            "o0:0-1-1:",
            "c0:0-1-1",
        ] {
            assert_eq!(Watermark::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Watermark::parse(&"o0:0-1-1".repeat(20)), None);
    }

    #[test]
    fn the_later_watermark_wins() {
        let w = |s: &str| Watermark::parse(s).unwrap();
        assert_eq!(w("o0:0-1-5").max(w("o0:0-1-9")), w("o0:0-1-9"));
        assert_eq!(w("o0:0-1-9").max(w("o0:0-1-5")), w("o0:0-1-9"));
        assert_eq!(
            w("o0:0-1-9").max(w("o0:1-2-1")),
            w("o0:1-2-1"),
            "another domain: the newer"
        );
        assert_eq!(Consistency::parse("session"), Some(Consistency::Session));
        assert_eq!(Consistency::parse("Session"), None);
        assert_eq!(Consistency::default(), Consistency::Session);
    }
}
