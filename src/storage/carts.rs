//! SQL of carts (`carts` in the commerce database): where the write-behind flusher puts the
//! carts Redis holds, where a cart missing from Redis is read back from, and where cart
//! changes go directly while Redis does not answer.
//!
//! Every write is guarded by the version: the flusher's upsert replaces a row only with a
//! newer version ([`upsert_newer`]), so two flushers (or a slow one) never put an older cart
//! back. A direct change ([`change`]) is a read-modify-write of one row in one short
//! transaction, the row locked; a cart without a row gets an empty one first, so that there
//! is a row to lock (under READ COMMITTED a locking read of a missing row locks nothing, and
//! two first changes of one cart would both start from the empty cart, the second
//! overwriting the first).

use crate::storage::Db;
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use crate::domain::cart::{Cart, StoredCart};
use crate::domain::ids::UserId;

use super::{corrupt, ts, Result};

/// Rows per upsert statement: 4 placeholders each, far below the 65 535 a statement may
/// bind, and a few hundred rows keep one statement's row locks short.
pub const UPSERT_CHUNK: usize = 500;

fn stored_from(version: i64, lines: &str, checkouts: &str) -> Result<StoredCart> {
    let cart = Cart::from_stored(lines, checkouts).ok_or_else(|| corrupt("cart", lines))?;
    Ok(StoredCart { version, cart })
}

/// The stored cart of `user` (version 0, empty: none stored).
pub async fn load(pool: &Db, user: UserId) -> Result<StoredCart> {
    let row = sqlx::query("SELECT version, items, checkouts FROM carts WHERE user_id = ?")
        .bind(user.get())
        .fetch_optional(pool)
        .await?;
    match row {
        None => Ok(StoredCart::default()),
        Some(r) => stored_from(
            r.try_get(0)?,
            &r.try_get::<String, _>(1)?,
            &r.try_get::<String, _>(2)?,
        ),
    }
}

/// Writes each cart whose version is newer than the stored one; older ones change nothing.
/// `version` is assigned last, so the other columns compare against the old version.
pub async fn upsert_newer(pool: &Db, carts: &[(UserId, StoredCart)], now: DateTime<Utc>) -> Result<()> {
    for chunk in carts.chunks(UPSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO carts (user_id, version, items, checkouts, updated_at) VALUES {}
             ON DUPLICATE KEY UPDATE
                items = IF(VALUES(version) > version, VALUES(items), items),
                checkouts = IF(VALUES(version) > version, VALUES(checkouts), checkouts),
                updated_at = IF(VALUES(version) > version, VALUES(updated_at), updated_at),
                version = GREATEST(version, VALUES(version))",
            vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (user, c) in chunk {
            q = q
                .bind(user.get())
                .bind(c.version)
                .bind(c.cart.lines_json())
                .bind(c.cart.checkouts_text())
                .bind(ts(now));
        }
        q.execute(pool).await?;
    }
    Ok(())
}

/// The stored versions of these users' carts (users without a row are left out).
pub async fn versions(pool: &Db, users: &[UserId]) -> Result<Vec<(UserId, i64)>> {
    let mut out = Vec::with_capacity(users.len());
    for chunk in users.chunks(UPSERT_CHUNK) {
        let sql = format!(
            "SELECT user_id, version FROM carts WHERE user_id IN ({})",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for u in chunk {
            q = q.bind(u.get());
        }
        for r in q.fetch_all(pool).await? {
            let id: i64 = r.try_get(0)?;
            out.push((
                UserId::new(id).ok_or_else(|| corrupt("user id", id))?,
                r.try_get(1)?,
            ));
        }
    }
    Ok(out)
}

/// A change made in MySQL directly: the cart is read with its row locked, `apply` changes it
/// (`Ok(false)`: nothing to write), and it is written back at its version plus `step`, in one
/// transaction. Answers the cart as it now stands and whether it changed.
pub async fn change<E>(
    pool: &Db,
    user: UserId,
    step: i64,
    now: DateTime<Utc>,
    apply: impl Fn(&mut Cart) -> std::result::Result<bool, E>,
) -> Result<std::result::Result<(StoredCart, bool), E>> {
    let mut conn = pool.acquire().await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    // A row to lock (see the module docs): a new cart's, empty at version 0, which is what
    // `load` answers for no row. `ON DUPLICATE KEY UPDATE` locks an existing row
    // exclusively; a plain insert's duplicate-key error would take a shared lock, which two
    // changes could not both upgrade to write. Rolled back below if nothing changes.
    let empty = StoredCart::default();
    sqlx::query(
        "INSERT INTO carts (user_id, version, items, checkouts, updated_at) VALUES (?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE user_id = user_id",
    )
    .bind(user.get())
    .bind(empty.version)
    .bind(empty.cart.lines_json())
    .bind(empty.cart.checkouts_text())
    .bind(ts(now))
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query("SELECT version, items, checkouts FROM carts WHERE user_id = ? FOR UPDATE")
        .bind(user.get())
        .fetch_one(&mut *tx)
        .await?;
    let mut stored = stored_from(
        row.try_get(0)?,
        &row.try_get::<String, _>(1)?,
        &row.try_get::<String, _>(2)?,
    )?;
    let changed = match apply(&mut stored.cart) {
        Ok(c) => c,
        Err(e) => {
            tx.rollback().await?;
            return Ok(Err(e));
        }
    };
    if !changed {
        tx.rollback().await?;
        return Ok(Ok((stored, false)));
    }
    stored.version += step;
    sqlx::query("UPDATE carts SET items = ?, checkouts = ?, updated_at = ?, version = ? WHERE user_id = ?")
        .bind(stored.cart.lines_json())
        .bind(stored.cart.checkouts_text())
        .bind(ts(now))
        .bind(stored.version)
        .bind(user.get())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Ok((stored, true)))
}
