//! [`TantivyIndex`]: the [`OrderIndex`] as a tantivy index in a local directory.
//!
//! # Schema (one document per order)
//! | field | kind | for |
//! |---|---|---|
//! | `order_id` | i64, indexed, fast | exact match of `q`; the term an upsert replaces by |
//! | `version` | i64, fast | the idempotency check (an upsert at or below it is skipped) |
//! | `user_id`, `shop_id` | i64, indexed | the caller's [`Scope`] |
//! | `status` | i64, indexed | the status filter (SPEC 1 codes) |
//! | `created_at_us` | i64, indexed, fast | the date range, and newest-first order (µs since 1970) |
//! | `products` | text (tantivy's default tokenizer: split on non-alphanumerics, lowercase) | product-name words |
//! | `tracking` | raw string | exact tracking number |
//! | `snapshot` | stored only | the order's snapshot JSON, which the API renders |
//!
//! A changed schema does not open an old index: delete the directory and run
//! `orderly project rebuild search`.
//!
//! # Writing
//! A directory has one writer (tantivy's lock file, `.tantivy-writer.lock`, taken with an OS
//! file lock, so a crashed holder frees it). The writer is taken by [`TantivyIndex::take_writer`]
//! (the consumer loop) or by the first upsert; an index without it still searches, and its
//! reader follows the holder's commits. Every upsert and clear runs under one mutex: it reads
//! the indexed versions, writes, commits and reloads the reader before the next one starts, so
//! the version check always sees every earlier commit.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use tantivy::collector::TopDocs;
use tantivy::directory::error::LockError;
use tantivy::directory::MmapDirectory;
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, Value, FAST, INDEXED, STORED, STRING, TEXT,
};
use tantivy::{
    Index, IndexReader, IndexWriter, Order, ReloadPolicy, Searcher, TantivyDocument, TantivyError, Term,
};

use super::{IndexError, OrderIndex, Scope, SearchQuery, Upserted};
use crate::config::SearchSettings;
use crate::domain::events::OrderSnapshot;

/// Indexing threads of the writer. Batches are small (at most a few hundred orders) and are
/// committed each; one thread indexes them in milliseconds and leaves the cores to the API.
const WRITER_THREADS: usize = 1;

/// The longest `q` a search takes: longer than any product name or tracking number a buyer
/// would type, short enough that a query cannot grow into thousands of terms.
pub const MAX_QUERY_CHARS: usize = 200;

#[derive(Debug, Clone, Copy)]
struct Fields {
    order_id: Field,
    version: Field,
    user_id: Field,
    shop_id: Field,
    status: Field,
    created_at_us: Field,
    products: Field,
    tracking: Field,
    snapshot: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let exact = NumericOptions::default().set_indexed();
    let fields = Fields {
        order_id: b.add_i64_field("order_id", INDEXED | FAST),
        version: b.add_i64_field("version", FAST),
        user_id: b.add_i64_field("user_id", exact.clone()),
        shop_id: b.add_i64_field("shop_id", exact.clone()),
        status: b.add_i64_field("status", exact),
        created_at_us: b.add_i64_field("created_at_us", INDEXED | FAST),
        products: b.add_text_field("products", TEXT),
        tracking: b.add_text_field("tracking", STRING),
        snapshot: b.add_text_field("snapshot", STORED),
    };
    (b.build(), fields)
}

fn engine(e: TantivyError) -> IndexError {
    match e {
        TantivyError::LockFailure(LockError::LockBusy, _) => IndexError::Locked,
        e => IndexError::Engine(e.to_string()),
    }
}

/// The order index in one directory.
pub struct TantivyIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    writer: Mutex<Option<IndexWriter<TantivyDocument>>>,
    memory_bytes: usize,
    /// This directory is not the deployment's index (another host writes that one: see
    /// `projection::run`): searches here would miss what the stream brought there.
    fed_elsewhere: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TantivyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TantivyIndex").finish_non_exhaustive()
    }
}

impl TantivyIndex {
    /// Opens the index in `settings.data_dir`, creating the directory and an empty index if
    /// there is none. Takes no writer.
    pub fn open(settings: &SearchSettings) -> Result<TantivyIndex, IndexError> {
        Self::open_in(&settings.data_dir, settings.writer_memory_mb)
    }

    pub fn open_in(dir: &Path, writer_memory_mb: usize) -> Result<TantivyIndex, IndexError> {
        std::fs::create_dir_all(dir)?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(dir).map_err(|e| IndexError::Engine(e.to_string()))?;
        let index = Index::open_or_create(directory, schema).map_err(engine)?;
        // Commits of another process (the writer's holder) are picked up on their own; this
        // process's own commits reload explicitly, so an upsert is visible when it answers.
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(engine)?;
        Ok(TantivyIndex {
            index,
            reader,
            fields,
            writer: Mutex::new(None),
            memory_bytes: writer_memory_mb * 1024 * 1024,
            fed_elsewhere: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks whether another host writes the deployment's index (see [`OrderIndex::fed_elsewhere`]).
    pub fn set_fed_elsewhere(&self, elsewhere: bool) {
        self.fed_elsewhere
            .store(elsewhere, std::sync::atomic::Ordering::Release);
    }

    /// Takes the directory's writer if this index does not hold it yet: [`IndexError::Locked`]
    /// while another process holds it.
    pub fn take_writer(&self) -> Result<(), IndexError> {
        let mut guard = self.writer.lock().map_err(|_| poisoned())?;
        self.writer_in(&mut guard)?;
        Ok(())
    }

    fn writer_in<'a>(
        &self,
        slot: &'a mut Option<IndexWriter<TantivyDocument>>,
    ) -> Result<&'a mut IndexWriter<TantivyDocument>, IndexError> {
        if slot.is_none() {
            let writer = self
                .index
                .writer_with_num_threads(WRITER_THREADS, self.memory_bytes)
                .map_err(engine)?;
            // The previous holder's last commits, before any version is checked against them.
            self.reader.reload().map_err(engine)?;
            *slot = Some(writer);
        }
        slot.as_mut().ok_or_else(poisoned)
    }

    fn id_term(&self, order_id: i64) -> Term {
        Term::from_field_i64(self.fields.order_id, order_id)
    }

    /// The highest version indexed for `order_id`, if any.
    fn indexed_version(&self, searcher: &Searcher, order_id: i64) -> Result<Option<i64>, IndexError> {
        let query = TermQuery::new(self.id_term(order_id), IndexRecordOption::Basic);
        let top = searcher
            .search(
                &query,
                &TopDocs::with_limit(1).order_by_fast_field::<i64>("version", Order::Desc),
            )
            .map_err(engine)?;
        Ok(top.first().and_then(|(v, _)| *v))
    }

    /// The versions of every document held for `order_id` (one at most, unless an invariant
    /// broke): for tests and diagnostics.
    pub fn versions_of(&self, order_id: i64) -> Result<Vec<i64>, IndexError> {
        let searcher = self.reader.searcher();
        let query = TermQuery::new(self.id_term(order_id), IndexRecordOption::Basic);
        let top = searcher
            .search(
                &query,
                &TopDocs::with_limit(1000).order_by_fast_field::<i64>("version", Order::Desc),
            )
            .map_err(engine)?;
        Ok(top.into_iter().filter_map(|(v, _)| v).collect())
    }

    /// Documents in the index (live ones).
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn document(&self, s: &OrderSnapshot) -> Result<TantivyDocument, IndexError> {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_i64(f.order_id, s.order_id);
        doc.add_i64(f.version, s.version);
        doc.add_i64(f.user_id, s.user_id);
        doc.add_i64(f.shop_id, s.shop_id);
        doc.add_i64(f.status, s.status);
        doc.add_i64(f.created_at_us, s.created_at.timestamp_micros());
        for line in &s.items {
            doc.add_text(f.products, &line.product_name);
        }
        if let Some(t) = &s.tracking_number {
            doc.add_text(f.tracking, t);
        }
        let json = serde_json::to_string(s).map_err(|e| IndexError::Snapshot(e.to_string()))?;
        doc.add_text(f.snapshot, json);
        Ok(doc)
    }

    /// `q` as a query: all its words in the product names, or the order id, or the tracking
    /// number exactly. `None` when nothing could match.
    fn text_query(&self, text: &str) -> Result<Option<Box<dyn Query>>, IndexError> {
        let f = &self.fields;
        let mut any: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut analyzer = self.index.tokenizer_for_field(f.products).map_err(engine)?;
        let mut stream = analyzer.token_stream(text);
        let mut words: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        while stream.advance() {
            let term = Term::from_field_text(f.products, &stream.token().text);
            words.push((
                Occur::Must,
                Box::new(TermQuery::new(term, IndexRecordOption::Basic)),
            ));
        }
        if !words.is_empty() {
            any.push((Occur::Should, Box::new(BooleanQuery::new(words))));
        }
        let trimmed = text.trim();
        if let Ok(id) = trimmed.parse::<i64>() {
            if id > 0 {
                any.push((
                    Occur::Should,
                    Box::new(TermQuery::new(self.id_term(id), IndexRecordOption::Basic)),
                ));
            }
        }
        if !trimmed.is_empty() {
            let term = Term::from_field_text(f.tracking, trimmed);
            any.push((
                Occur::Should,
                Box::new(TermQuery::new(term, IndexRecordOption::Basic)),
            ));
        }
        Ok((!any.is_empty()).then(|| Box::new(BooleanQuery::new(any)) as Box<dyn Query>))
    }

    fn query(&self, q: &SearchQuery) -> Result<Option<Box<dyn Query>>, IndexError> {
        let f = &self.fields;
        let exact = |field: Field, v: i64| -> (Occur, Box<dyn Query>) {
            (
                Occur::Must,
                Box::new(TermQuery::new(
                    Term::from_field_i64(field, v),
                    IndexRecordOption::Basic,
                )),
            )
        };
        let mut all: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        match q.scope {
            Scope::User(u) => all.push(exact(f.user_id, u.get())),
            Scope::Shop(s) => all.push(exact(f.shop_id, s.get())),
            Scope::All => {}
        }
        if let Some(s) = q.status {
            all.push(exact(f.status, i64::from(s.code())));
        }
        if q.created_from.is_some() || q.created_to.is_some() {
            let bound = |t: Option<chrono::DateTime<chrono::Utc>>, inclusive: bool| match t {
                None => Bound::Unbounded,
                Some(t) => {
                    let term = Term::from_field_i64(f.created_at_us, t.timestamp_micros());
                    if inclusive {
                        Bound::Included(term)
                    } else {
                        Bound::Excluded(term)
                    }
                }
            };
            all.push((
                Occur::Must,
                Box::new(RangeQuery::new(
                    bound(q.created_from, true),
                    bound(q.created_to, false),
                )),
            ));
        }
        if let Some(text) = &q.text {
            match self.text_query(text)? {
                Some(t) => all.push((Occur::Must, t)),
                None => return Ok(None),
            }
        }
        Ok(Some(if all.is_empty() {
            Box::new(AllQuery)
        } else {
            Box::new(BooleanQuery::new(all))
        }))
    }
}

fn poisoned() -> IndexError {
    IndexError::Engine("the index writer's lock is poisoned".into())
}

impl OrderIndex for TantivyIndex {
    fn fed_elsewhere(&self) -> bool {
        self.fed_elsewhere.load(std::sync::atomic::Ordering::Acquire)
    }

    fn upsert(&self, snapshots: &[OrderSnapshot]) -> Result<Upserted, IndexError> {
        // The newest snapshot of each order in the batch: uncommitted documents are not
        // searchable, so versions inside one batch are settled here.
        let mut newest: HashMap<i64, &OrderSnapshot> = HashMap::new();
        for s in snapshots {
            newest
                .entry(s.order_id)
                .and_modify(|kept| {
                    if s.version > kept.version {
                        *kept = s;
                    }
                })
                .or_insert(s);
        }
        let mut guard = self.writer.lock().map_err(|_| poisoned())?;
        let writer = self.writer_in(&mut guard)?;
        let searcher = self.reader.searcher();
        let mut written = 0;
        for s in newest.values() {
            if self
                .indexed_version(&searcher, s.order_id)?
                .is_some_and(|v| v >= s.version)
            {
                continue;
            }
            writer.delete_term(self.id_term(s.order_id));
            writer.add_document(self.document(s)?).map_err(engine)?;
            written += 1;
        }
        if written > 0 {
            writer.commit().map_err(engine)?;
            self.reader.reload().map_err(engine)?;
        }
        Ok(Upserted {
            written,
            skipped: snapshots.len() - written,
        })
    }

    fn search(&self, q: &SearchQuery) -> Result<Vec<OrderSnapshot>, IndexError> {
        let Some(query) = self.query(q)? else {
            return Ok(Vec::new());
        };
        let searcher = self.reader.searcher();
        let limit = q.limit.clamp(1, super::MAX_LIMIT);
        let top = searcher
            .search(
                &query,
                &TopDocs::with_limit(limit).order_by_fast_field::<i64>("created_at_us", Order::Desc),
            )
            .map_err(engine)?;
        top.into_iter()
            .map(|(_, address)| {
                let doc: TantivyDocument = searcher.doc(address).map_err(engine)?;
                let json = doc
                    .get_first(self.fields.snapshot)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| IndexError::Snapshot("a document without its snapshot".into()))?;
                serde_json::from_str(json).map_err(|e| IndexError::Snapshot(e.to_string()))
            })
            .collect()
    }

    fn clear(&self) -> Result<(), IndexError> {
        let mut guard = self.writer.lock().map_err(|_| poisoned())?;
        let writer = self.writer_in(&mut guard)?;
        writer.delete_all_documents().map_err(engine)?;
        writer.commit().map_err(engine)?;
        self.reader.reload().map_err(engine)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone, Utc};

    use super::*;
    use crate::domain::events::LineSnapshot;
    use crate::domain::ids::{ShopId, UserId};

    fn snapshot(order_id: i64, version: i64, user: i64, names: &[&str]) -> OrderSnapshot {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + TimeDelta::minutes(order_id);
        OrderSnapshot {
            order_id,
            user_id: user,
            shop_id: 1,
            status: 0,
            version,
            currency: "CNY".into(),
            total_amount: 100,
            discount_amount: 0,
            pay_amount: 100,
            receiver_name: "n".into(),
            receiver_phone: "p".into(),
            receiver_region: String::new(),
            receiver_detail: "d".into(),
            remark: String::new(),
            tracking_number: None,
            carrier: None,
            close_reason: None,
            refund_required: false,
            created_at: at,
            pay_deadline: at,
            updated_at: at,
            paid_at: None,
            shipped_at: None,
            completed_at: None,
            closed_at: None,
            invalidated_at: None,
            items: names
                .iter()
                .enumerate()
                .map(|(i, n)| LineSnapshot {
                    line_no: i as i64 + 1,
                    product_id: 1,
                    product_name: (*n).into(),
                    unit_price: 100,
                    quantity: 1,
                    line_total: 100,
                })
                .collect(),
            payments: Vec::new(),
            discounts: Vec::new(),
        }
    }

    fn found(index: &TantivyIndex, q: &SearchQuery) -> Vec<(i64, i64)> {
        let hits = index.search(q).unwrap();
        hits.iter().map(|s| (s.order_id, s.version)).collect()
    }

    fn text(t: &str) -> SearchQuery {
        SearchQuery {
            text: Some(t.into()),
            ..SearchQuery::new(Scope::All)
        }
    }

    #[test]
    fn every_word_must_match_a_product_name_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let index = TantivyIndex::open_in(dir.path(), 15).unwrap();
        index
            .upsert(&[
                snapshot(1, 1, 10, &["Red Kettle", "Blue Cup"]),
                snapshot(2, 1, 10, &["red cup"]),
            ])
            .unwrap();
        assert_eq!(found(&index, &text("RED")), vec![(2, 1), (1, 1)], "newest first");
        assert_eq!(found(&index, &text("red kettle")), vec![(1, 1)]);
        assert_eq!(
            found(&index, &text("kettle cup")),
            vec![(1, 1)],
            "words of two lines"
        );
        assert_eq!(found(&index, &text("green kettle")), vec![]);
        assert_eq!(found(&index, &text("!!!")), vec![]);
        assert_eq!(found(&index, &text("2")), vec![(2, 1)], "an order id");
    }

    #[test]
    fn an_older_or_equal_version_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let index = TantivyIndex::open_in(dir.path(), 15).unwrap();
        let first = index.upsert(&[snapshot(1, 2, 10, &["new name"])]).unwrap();
        assert_eq!(
            first,
            Upserted {
                written: 1,
                skipped: 0
            }
        );
        let again = index
            .upsert(&[snapshot(1, 1, 10, &["old name"]), snapshot(1, 2, 10, &["other"])])
            .unwrap();
        assert_eq!(
            again,
            Upserted {
                written: 0,
                skipped: 2
            }
        );
        assert_eq!(found(&index, &text("old")), vec![]);
        assert_eq!(found(&index, &text("new")), vec![(1, 2)]);
        // A batch with several versions keeps the highest, whatever their order.
        index
            .upsert(&[snapshot(1, 4, 10, &["four"]), snapshot(1, 3, 10, &["three"])])
            .unwrap();
        assert_eq!(index.versions_of(1).unwrap(), vec![4]);
        index.clear().unwrap();
        assert!(index.is_empty());
    }

    #[test]
    fn scope_and_dates_are_part_of_the_query() {
        let dir = tempfile::tempdir().unwrap();
        let index = TantivyIndex::open_in(dir.path(), 15).unwrap();
        index
            .upsert(&[
                snapshot(1, 1, 10, &["lamp"]),
                snapshot(2, 1, 20, &["lamp"]),
                snapshot(3, 1, 20, &["lamp"]),
            ])
            .unwrap();
        let user = |u: i64, limit: usize| SearchQuery {
            limit,
            ..SearchQuery::new(Scope::User(UserId::new(u).unwrap()))
        };
        // The oldest order is the user's: found with a limit of one.
        assert_eq!(found(&index, &user(10, 1)), vec![(1, 1)]);
        assert_eq!(found(&index, &user(20, 5)), vec![(3, 1), (2, 1)]);
        let shop = SearchQuery::new(Scope::Shop(ShopId::new(2).unwrap()));
        assert_eq!(found(&index, &shop), vec![]);
        // From is inclusive, to exclusive.
        let at = |n: i64| Some(snapshot(n, 1, 1, &[]).created_at);
        let range = SearchQuery {
            created_from: at(2),
            created_to: at(3),
            ..SearchQuery::new(Scope::All)
        };
        assert_eq!(found(&index, &range), vec![(2, 1)]);
    }
}
