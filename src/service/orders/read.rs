//! Reads of orders: one order by id, the lists of a buyer (keyset pages, opaque cursors),
//! the archive's part of both, and which server answered (`Served`) at which consistency.
//!
//! An order old enough to be archived that its shard does not have is looked for in the
//! archive (an order moves there before it leaves the shard); a list that reaches back past
//! the archive horizon merges the archive's page, or answers the hot part alone with
//! `archive_unavailable` when the archive fails.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::actor::Caller;
use crate::domain::consistency::{Consistency, Gtid, Watermark};
use crate::domain::ids::{OrderId, UserId};
use crate::domain::order::{FieldErrors, Order};
use crate::domain::shard::Gene;
use crate::domain::status::OrderStatus;
use crate::redis::cache::FIRST_PAGE;
use crate::storage::orders::{self, ListQuery};
use crate::storage::replicas::{self, Database, Read, ReadQuery};
use crate::storage::shards::Shard;

use crate::service::watermarks::WatermarkOf;
use crate::service::{Error, Result};

use super::{ArchiveReads, OrderService, ID_MAX_AGE, ID_MAX_SKEW};

/// The largest page of `GET /v1/orders`.
pub const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 20;

/// What the archive did for a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FromArchive {
    /// Not asked (the page does not reach back that far, or the buyer has no archived
    /// orders), or it had nothing for the page.
    Nothing,
    /// It added orders to the page.
    Added,
    /// It failed or did not answer in time: the page is the hot store's part only.
    Unavailable,
}

/// What a list read on the shard found: the page, and whether the buyer has archived
/// orders, read after it on its connection (`None`: not asked, the page does not reach the
/// archive).
struct HotPage {
    orders: Vec<Order>,
    archived: Option<bool>,
}

/// [`HotPage::archived`] of a cache-aside read, set when its loader ran (`None` otherwise).
#[derive(Default)]
struct ArchivedCell(std::sync::atomic::AtomicU8);

impl ArchivedCell {
    fn set(&self, archived: Option<bool>) {
        let v = match archived {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Option<bool> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
}

/// Every archived order was created before this: its id is older than its pass's cutoff
/// (at least `min_age` ago), and an order is created within a day of its id.
fn archive_horizon(min_age: TimeDelta, now: DateTime<Utc>) -> DateTime<Utc> {
    now - min_age + ID_MAX_AGE + ID_MAX_SKEW
}

/// Whether `page`, the shard's answer to `q`, may lack archived orders: unless it is full of
/// orders too young to be archived, or `q` asks only for such.
fn reaches_archive(page: &[Order], q: &ListQuery, horizon: DateTime<Utc>) -> bool {
    let want = q.limit as usize;
    let full_of_young = want > 0 && page.len() >= want && page[want - 1].created_at >= horizon;
    !full_of_young && q.created_from.is_none_or(|from| from < horizon)
}

/// How a read must be served: its consistency, and the token of a write the client wants to
/// see (from the `Consistency-Token` header of an earlier answer, on any connection).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    pub consistency: Consistency,
    pub token: Option<Watermark>,
}

/// Which part of the system answered a read (the `Served-By` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Cache,
    Primary,
    Replica,
    /// The archive of old orders (the order is no longer in its shard).
    Archive,
}

impl Served {
    pub fn name(self) -> &'static str {
        match self {
            Served::Cache => "cache",
            Served::Primary => "primary",
            Served::Replica => "replica",
            Served::Archive => "archive",
        }
    }

    fn of<T>(read: &Read<T>) -> Served {
        match read.served {
            replicas::Served::Primary => Served::Primary,
            replicas::Served::Replica => Served::Replica,
        }
    }
}

/// Where a cache-aside read was served from: the cache unless its loader ran.
#[derive(Default)]
struct ServedCell(std::sync::atomic::AtomicU8);

impl ServedCell {
    fn set(&self, s: Served) {
        self.0.store(s as u8 + 1, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> Served {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            2 => Served::Primary,
            3 => Served::Replica,
            4 => Served::Archive,
            _ => Served::Cache,
        }
    }
}

/// A page of `GET /v1/orders`.
#[derive(Debug)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    pub next_cursor: Option<String>,
    pub served: Served,
    /// The page reaches back into the archive, which failed or did not answer in time: it
    /// holds the hot store's orders only.
    pub archive_unavailable: bool,
}

/// A keyset position in a list, newest first: `(created_at, order_id)` of the last order seen.
pub(crate) type Keyset = (DateTime<Utc>, OrderId);

/// The filters and the page of every order list (a buyer's, a shop's), already parsed.
#[derive(Debug, Clone, Default)]
pub struct ListFilters {
    pub status: Option<OrderStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl ListFilters {
    /// The page size (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) and the keyset position
    /// the cursor names: orders strictly older than it.
    pub(crate) fn page(&self) -> Result<(u32, Option<Keyset>)> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(FieldErrors::single("limit", format!("must be between 1 and {MAX_PAGE}")).into());
        }
        let before = match &self.cursor {
            None => None,
            Some(c) => Some(
                decode_cursor(c)
                    .ok_or_else(|| FieldErrors::single("cursor", "is not a cursor this service issued"))?,
            ),
        };
        Ok((limit, before))
    }
}

/// `GET /v1/orders`: whose orders (administrators name a user), and the filters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub user_id: Option<UserId>,
    pub filters: ListFilters,
}

const CURSOR_PREFIX: &str = "v1.";

pub(crate) fn encode_cursor(o: &Order) -> String {
    use base64::Engine;
    let raw = format!(
        "{CURSOR_PREFIX}{}.{}",
        o.created_at.timestamp_micros(),
        o.order_id.get()
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(s: &str) -> Option<(DateTime<Utc>, OrderId)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let rest = raw.strip_prefix(CURSOR_PREFIX)?;
    let (micros, id) = rest.split_once('.')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    if !crate::domain::order::is_storable_time(&at) {
        return None;
    }
    Some((at, OrderId::parse(id)?))
}

/// Whether `id` cannot be an order `caller` may see, without asking any store (cache
/// penetration): an id from the future cannot exist yet, and a buyer's orders all carry the
/// buyer's gene. (An id's time cannot precede the id epoch: the field is unsigned.)
fn cannot_exist(caller: Caller, id: OrderId, now: DateTime<Utc>) -> bool {
    if id.created_at() > now + ID_MAX_SKEW {
        return true;
    }
    matches!(caller, Caller::User(u) if id.gene() != Gene::of_user(u))
}

impl OrderService {
    /// The archive if `id` is old enough to be in it: an order younger than
    /// `archive.min_age_days` is never moved, so its absence from the shard is final.
    pub(super) fn archive_for(&self, id: OrderId) -> Option<&ArchiveReads> {
        self.archive
            .as_ref()
            .filter(|a| id.created_at() < self.clock.now() - a.min_age)
    }

    /// The archived order `id`, read on the archive's primary (it has no replicas) within
    /// `archive.read_timeout_ms`. Asked only after the shard answered "no such order": an
    /// order moves into the archive before it leaves the shard, so one of the two reads
    /// finds it.
    pub(super) async fn archived(&self, id: OrderId) -> Result<Option<Order>> {
        let Some(a) = self.archive_for(id) else {
            return Ok(None);
        };
        a.read(|c| -> ReadQuery<'_, Option<Order>> { Box::pin(crate::storage::archive::load(c, id)) })
            .await
    }

    /// The consistency token of the newest write of `order` this process committed (what a
    /// write answers in its `Consistency-Token` header; recorded before the write returned).
    pub fn consistency_token(&self, order: OrderId) -> Option<Watermark> {
        self.watermarks.get(WatermarkOf::Order(order))
    }

    /// The newest write on `db` a `session` read of `of` is known to need: the later of this
    /// process's watermark and the client's token, those of `db` only. It only raises the
    /// read's fence ([`Database::read`]), which already holds every acknowledged write; the
    /// token is what the client proves it saw.
    pub(super) fn watermark(&self, db: &Database, of: WatermarkOf, token: Option<Watermark>) -> Option<Gtid> {
        if !db.has_replicas() {
            return None;
        }
        [self.watermarks.get(of), token]
            .into_iter()
            .flatten()
            .filter(|w| w.database == db.reference())
            .reduce(Watermark::max)
            .map(|w| w.gtid)
    }

    /// The order `id` from the server `read` calls for (a `session` read waits for
    /// `watermark`); a `session` read that a replica answers with "no such order" asks the
    /// primary (the create may not have arrived there yet, and an absence must never be
    /// cached from a lagging copy). An order old enough to be archived that the shard does
    /// not have is then looked for in the archive.
    pub(super) async fn load_order(
        &self,
        shard: &Shard,
        id: OrderId,
        consistency: Consistency,
        watermark: Option<Gtid>,
    ) -> Result<(Option<Order>, Served)> {
        let db = self.shards.database(shard);
        let tables = shard.tables.clone();
        let query = replicas::query(move |c| -> ReadQuery<'_, Option<Order>> {
            let t = tables.clone();
            Box::pin(async move { orders::load_order(c, &t, id).await })
        });
        let mut found = db.read(consistency, watermark.as_ref(), &query).await?;
        if found.value.is_none()
            && found.served == replicas::Served::Replica
            && consistency == Consistency::Session
        {
            found = db.read(Consistency::Strong, None, &query).await?;
        }
        let served = Served::of(&found);
        if found.value.is_some() {
            return Ok((found.value, served));
        }
        Ok(match self.archived(id).await? {
            Some(o) => (Some(o), Served::Archive),
            None => (None, served),
        })
    }

    // ------------------------------------------------------------------ read

    /// The order if `caller` may see it; another party's order is `NotFound`.
    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    ///
    /// `session` (the default) reads through the cache, whose loader reads a replica that has
    /// the order's latest write; `eventual` takes a cache hit or any replica's copy and never
    /// fills the cache; `strong` reads the primary.
    pub async fn get(&self, caller: Caller, id: OrderId, read: ReadOptions) -> Result<(Order, Served)> {
        if caller == Caller::Service {
            return Err(Error::Forbidden("the payment channel reads no orders"));
        }
        if cannot_exist(caller, id, self.clock.now()) {
            return Err(Error::NotFound);
        }
        let shard = self.shards.of_order(id);
        let served = &ServedCell::default();
        let db = self.shards.database(shard);
        let of = WatermarkOf::Order(id);
        let order = match read.consistency {
            Consistency::Session => {
                self.cache
                    .order(id, db.reference(), || async move {
                        let watermark = self.watermark(db, of, read.token);
                        let (found, from) = self
                            .load_order(shard, id, Consistency::Session, watermark)
                            .await?;
                        served.set(from);
                        Ok::<_, Error>(found)
                    })
                    .await?
            }
            Consistency::Eventual => match self.cache.order_hit(id).await {
                Some(hit) => hit,
                None => {
                    let (found, from) = self.load_order(shard, id, Consistency::Eventual, None).await?;
                    served.set(from);
                    found
                }
            },
            Consistency::Strong => {
                let (found, from) = self.load_order(shard, id, Consistency::Strong, None).await?;
                served.set(from);
                found
            }
        };
        match order {
            Some(o) if caller.can_see(&o) => Ok((o, served.get())),
            _ => Err(Error::NotFound),
        }
    }

    pub(super) async fn load_visible(
        &self,
        conn: &mut crate::storage::Conn,
        shard: &Shard,
        caller: Caller,
        id: OrderId,
    ) -> Result<Order> {
        match orders::load_order(conn, &shard.tables, id).await? {
            Some(o) if caller.can_see(&o) => Ok(o),
            Some(_) => Err(Error::NotFound),
            None => Err(self.absent(caller, id).await),
        }
    }

    /// Why a change of `id`, which its shard does not hold, is refused: `archived` if the
    /// caller may see it in the archive, else `not_found`.
    pub(super) async fn absent(&self, caller: Caller, id: OrderId) -> Error {
        match self.archived(id).await {
            Ok(Some(o)) if caller.can_see(&o) => Error::Archived,
            Ok(_) => Error::NotFound,
            Err(e) => e,
        }
    }

    #[tracing::instrument(skip_all, fields(user_id = tracing::field::Empty, shard = tracing::field::Empty, caller = ?caller))]
    ///
    /// Read like [`Self::get`]: the cached first page in `session` mode, else the server
    /// `read` calls for, with the user's watermark (the newest write of any of their orders).
    pub async fn list(&self, caller: Caller, p: ListParams, read: ReadOptions) -> Result<OrderPage> {
        let user = match (caller, p.user_id) {
            (Caller::User(u), None) => u,
            (Caller::User(u), Some(asked)) if asked == u => u,
            (Caller::User(_), Some(_)) => {
                return Err(FieldErrors::single("user_id", "a buyer lists only their own orders").into())
            }
            (Caller::Admin(_), Some(u)) => u,
            (Caller::Admin(_), None) => {
                return Err(FieldErrors::single("user_id", "required for administrators").into())
            }
            (Caller::Merchant { .. } | Caller::Service, _) => {
                return Err(Error::Forbidden("only buyers and administrators list orders"))
            }
        };
        let (limit, before) = p.filters.page()?;
        let p = p.filters;
        let shard = self.shards.of_user(user);
        tracing::Span::current()
            .record("user_id", tracing::field::display(user))
            .record("shard", shard.index.get());
        let db = self.shards.database(shard);
        let of = WatermarkOf::User(user);
        let unfiltered = p.status.is_none() && p.created_from.is_none() && p.created_to.is_none();
        let cached = unfiltered && before.is_none() && (limit as usize) < FIRST_PAGE;
        let query = ListQuery {
            user_id: user,
            status: p.status,
            created_from: p.created_from,
            created_to: p.created_to,
            before,
            limit: if cached { FIRST_PAGE as u32 } else { limit + 1 },
        };
        let archive_query = ListQuery {
            limit: limit + 1,
            ..query.clone()
        };
        // Once for the read and the merge: they agree on whether the page reaches the
        // archive (the read asks for at least as many orders as the merge wants).
        let horizon = self
            .archive
            .as_ref()
            .map(|a| archive_horizon(a.min_age, self.clock.now()));
        let tables = shard.tables.clone();
        let list = replicas::query(move |c| -> ReadQuery<'_, HotPage> {
            let (t, q) = (tables.clone(), query.clone());
            Box::pin(async move {
                let orders = orders::list_user_orders(c, &t, &q).await?;
                // After the list, on its connection: see `merge_archived`.
                let archived = match horizon {
                    Some(h) if reaches_archive(&orders, &q, h) => {
                        Some(orders::has_archived_orders(c, &t, q.user_id).await?)
                    }
                    _ => None,
                };
                Ok(HotPage { orders, archived })
            })
        });
        let served = ServedCell::default();
        let loaded = ArchivedCell::default();
        let list = &list;
        let (served, loaded) = (&served, &loaded);
        let (mut page, archived) = if cached && read.consistency == Consistency::Session {
            let page = self
                .cache
                .first_page(user, db.reference(), || async move {
                    let watermark = self.watermark(db, of, read.token);
                    let found = db.read(read.consistency, watermark.as_ref(), list).await?;
                    served.set(Served::of(&found));
                    loaded.set(found.value.archived);
                    Ok::<_, Error>(found.value.orders)
                })
                .await?;
            // A page from Redis (or another request's load) comes without it.
            (page, loaded.get())
        } else {
            let watermark = match read.consistency {
                Consistency::Session => self.watermark(db, of, read.token),
                _ => None,
            };
            let found = db.read(read.consistency, watermark.as_ref(), list).await?;
            served.set(Served::of(&found));
            (found.value.orders, found.value.archived)
        };
        let from_archive = match horizon {
            Some(h) => {
                self.merge_archived(&mut page, &archive_query, h, shard, archived)
                    .await
            }
            None => FromArchive::Nothing,
        };
        if from_archive == FromArchive::Added {
            served.set(Served::Archive);
        }
        let next = if page.len() > limit as usize {
            page.truncate(limit as usize);
            page.last().map(encode_cursor)
        } else {
            None
        };
        Ok(OrderPage {
            orders: page,
            next_cursor: next,
            served: served.get(),
            archive_unavailable: from_archive == FromArchive::Unavailable,
        })
    }

    /// Whether the shard records archived orders of `user`, read on its primary: for a page
    /// read without it (from the cache), which may come from a newer copy than a replica.
    /// If the primary cannot say, assumed (the archive is asked).
    async fn archive_recorded(&self, shard: &Shard, user: UserId) -> bool {
        let db = self.shards.database(shard);
        let tables = shard.tables.clone();
        let query = replicas::query(move |c| -> ReadQuery<'_, bool> {
            let t = tables.clone();
            Box::pin(async move { orders::has_archived_orders(c, &t, user).await })
        });
        match db.read(Consistency::Strong, None, &query).await {
            Ok(found) => found.value,
            Err(e) => {
                tracing::warn!(error = %e, %user, "cannot read whether the buyer has archived orders; asking the archive");
                true
            }
        }
    }

    /// Adds the user's archived orders that belong in `page` (the shard's, newest first, read
    /// before this), unless the page is full of orders too young to be archived (before
    /// `horizon`), or the shard has no record of archived orders of the buyer: `archived`,
    /// read after the page on its connection, or (`None`) now on the shard's primary. The
    /// shard is read first, the archive second: an order moving meanwhile is in the archive
    /// before it leaves the shard, and the transaction that deletes it there records its
    /// buyer, so the page misses none; one in both places is shown once, as the shard has it.
    /// An archive that fails or does not answer within `archive.read_timeout_ms` leaves the
    /// page as the shard has it ([`FromArchive::Unavailable`]): never a failed list.
    async fn merge_archived(
        &self,
        page: &mut Vec<Order>,
        q: &ListQuery,
        horizon: DateTime<Utc>,
        shard: &Shard,
        archived: Option<bool>,
    ) -> FromArchive {
        let Some(a) = &self.archive else {
            return FromArchive::Nothing;
        };
        if !reaches_archive(page, q, horizon) {
            return FromArchive::Nothing;
        }
        let recorded = match archived {
            Some(known) => known,
            None => self.archive_recorded(shard, q.user_id).await,
        };
        if !recorded {
            return FromArchive::Nothing;
        }
        let query = q.clone();
        let found = a
            .read(move |c| -> ReadQuery<'_, Vec<Order>> {
                Box::pin(async move { crate::storage::archive::list_user_orders(c, &query).await })
            })
            .await;
        let mut older: std::collections::HashMap<i64, Order> = match found {
            Ok(orders) => orders.into_iter().map(|o| (o.order_id.get(), o)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, user = %q.user_id, "the archive did not answer; the list is its hot part");
                return FromArchive::Unavailable;
            }
        };
        // In both places mid-move, or a lagging replica's copy of an order that has since
        // moved and taken money in the archive: the newer version is the order.
        for o in page.iter_mut() {
            if let Some(newer) = older.remove(&o.order_id.get()).filter(|x| x.version > o.version) {
                *o = newer;
            }
        }
        let hot: std::collections::HashSet<i64> = page.iter().map(|o| o.order_id.get()).collect();
        let before = page.len();
        page.extend(older.into_values());
        if page.len() == before {
            return FromArchive::Nothing;
        }
        page.sort_by_key(|o| std::cmp::Reverse((o.created_at, o.order_id.get())));
        page.truncate((q.limit as usize).max(before));
        match page.iter().any(|o| !hot.contains(&o.order_id.get())) {
            true => FromArchive::Added,
            false => FromArchive::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_760_000_000_123_456).unwrap();
        let id = OrderId::new(123456789).unwrap();
        let raw = format!("{CURSOR_PREFIX}{}.{}", at.timestamp_micros(), id.get());
        use base64::Engine;
        let c = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(decode_cursor(&c), Some((at, id)));
        for bad in ["", "!!", "djEuMTIz", "eDEuMS4y"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
