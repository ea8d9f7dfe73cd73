//! The merchant's views: its shop's orders from the copy sharded by shop, and its daily
//! reports. A copy fed by the event stream, so every answer says how far behind it is.
//! A shop's merchant and administrators may read; another shop's merchant is told the shop
//! does not exist (404), so existence does not leak; buyers and the payment channel may never.

use chrono::NaiveDate;

use crate::domain::actor::Caller;
use crate::domain::ids::ShopId;
use crate::domain::order::{FieldErrors, Order};
use crate::storage::merchant::{self, CopyState, DailyReport, MerchantMap, ShopQuery};

use super::orders::{encode_cursor, ListFilters};
use super::{Error, Result};

/// The longest report range one request may ask for: a year, with a leap day.
pub const MAX_REPORT_DAYS: i64 = 366;

/// A page of a shop's orders and the state of the copy it came from.
#[derive(Debug)]
pub struct ShopPage {
    pub orders: Vec<Order>,
    pub next_cursor: Option<String>,
    pub copy: Option<CopyState>,
}

#[derive(Debug, Clone)]
pub struct MerchantService {
    map: MerchantMap,
}

impl MerchantService {
    pub fn new(map: MerchantMap) -> Self {
        MerchantService { map }
    }

    pub fn map(&self) -> &MerchantMap {
        &self.map
    }

    /// Whether `caller` may read `shop`'s copy: checked before anything else, so another
    /// shop's merchant learns nothing, not even which parameters are wrong.
    pub fn allow(caller: Caller, shop: ShopId) -> Result<()> {
        match caller {
            Caller::Admin(_) => Ok(()),
            Caller::Merchant { shop: own, .. } if own == shop => Ok(()),
            Caller::Merchant { .. } => Err(Error::NotFound),
            Caller::User(_) | Caller::Service => Err(Error::Forbidden(
                "only the shop's merchant and administrators read a shop's orders",
            )),
        }
    }

    pub async fn list(&self, caller: Caller, shop: ShopId, p: ListFilters) -> Result<ShopPage> {
        Self::allow(caller, shop)?;
        let (limit, before) = p.page()?;
        let q = ShopQuery {
            shop,
            status: p.status,
            created_from: p.created_from,
            created_to: p.created_to,
            before: before.map(|(at, id)| (at, id.get())),
            limit: limit + 1,
        };
        let snapshots = merchant::list(&self.map, &q).await?;
        let mut orders = snapshots
            .iter()
            .map(|s| {
                s.to_order().ok_or_else(|| {
                    Error::Storage(crate::storage::StorageError::Corrupt(format!(
                        "merchant copy of order {}",
                        s.order_id
                    )))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next_cursor = if orders.len() > limit as usize {
            orders.truncate(limit as usize);
            orders.last().map(encode_cursor)
        } else {
            None
        };
        let copy = merchant::state(&self.map, shop).await?;
        Ok(ShopPage {
            orders,
            next_cursor,
            copy,
        })
    }

    pub async fn daily(
        &self,
        caller: Caller,
        shop: ShopId,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<(Vec<DailyReport>, Option<CopyState>)> {
        Self::allow(caller, shop)?;
        if to < from {
            return Err(FieldErrors::single("to", "must not be before from").into());
        }
        if (to - from).num_days() >= MAX_REPORT_DAYS {
            return Err(
                FieldErrors::single("to", format!("at most {MAX_REPORT_DAYS} days from from")).into(),
            );
        }
        let days = merchant::daily_reports(&self.map, shop, from, to).await?;
        let copy = merchant::state(&self.map, shop).await?;
        Ok((days, copy))
    }
}
