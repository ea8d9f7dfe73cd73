//! The merchant's routes: a shop's orders from the copy sharded by shop, and its daily
//! reports (SPEC 6). Both answer `copy`: how far behind the shards the copy was when it last
//! applied a batch of events.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::ids::ShopId;
use crate::domain::status::OrderStatus;
use crate::service::merchant::MerchantService;
use crate::service::orders::ListFilters;
use crate::service::Error;
use crate::storage::merchant::{CopyState, DailyReport};

use super::auth::Auth;
use super::error::ApiError;
use super::extract::{PathParam, QueryMap};
use super::openapi::{Forbidden, NotFound, Unauthorized, Unavailable, Unprocessable};
use super::orders::{list_filter, OrderView};
use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(shop_orders))
        .routes(routes!(daily_reports))
}

type ApiResult = Result<Response, ApiError>;

/// How far behind the shards the copy is.
#[derive(Serialize, ToSchema)]
pub struct CopyLag {
    /// Events the stream held that the copy had not applied, when it last applied a batch
    /// (0: it had caught up then). Events still in the shards' outboxes are not counted.
    pending_events: i64,
    /// Commit time of the newest order change the copy holds.
    applied_through: Option<DateTime<Utc>>,
    /// When the copy last applied a batch.
    checked_at: Option<DateTime<Utc>>,
}

impl From<Option<CopyState>> for CopyLag {
    fn from(s: Option<CopyState>) -> Self {
        CopyLag {
            pending_events: s.map_or(0, |s| s.pending),
            applied_through: s.and_then(|s| s.applied_through),
            checked_at: s.map(|s| s.updated_at),
        }
    }
}

/// A page of a shop's orders, newest first.
#[derive(Serialize, ToSchema)]
pub struct ShopOrderList<'a> {
    orders: Vec<OrderView<'a>>,
    /// Opaque; send it back as `cursor` for the next page. `null` on the last page.
    next_cursor: Option<String>,
    copy: CopyLag,
}

fn shop_id(raw: &str) -> Result<ShopId, ApiError> {
    Ok(ShopId::parse(raw).ok_or(Error::NotFound)?)
}

#[utoipa::path(
    get,
    path = "/v1/shops/{shop_id}/orders",
    operation_id = "list_shop_orders",
    tag = "merchant",
    description = "A shop's orders, newest first (keyset pages), from the merchant copy: for the shop's merchant and administrators.",
    params(
        ("shop_id" = ShopId, Path, description = "The shop"),
        ("status" = Option<String>, Query, description = "A status name or code"),
        ("created_from" = Option<DateTime<Utc>>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<DateTime<Utc>>, Query, description = "RFC 3339"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page", body = ShopOrderList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn shop_orders(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(shop): PathParam,
    QueryMap(params): QueryMap,
) -> ApiResult {
    let shop = shop_id(&shop)?;
    MerchantService::allow(c, shop)?;
    let mut errors = crate::domain::order::FieldErrors::default();
    let mut p = ListFilters::default();
    for (k, v) in &params {
        list_filter(k, v, &mut p, &mut errors);
    }
    errors.into_result(())?;
    let page = s.merchant.list(c, shop, p).await?;
    let body = ShopOrderList {
        orders: page.orders.iter().map(OrderView::from).collect(),
        next_cursor: page.next_cursor,
        copy: page.copy.into(),
    };
    Ok(axum::Json(body).into_response())
}

/// One day's figures of a shop; amounts in minor units of the shop's currency.
#[derive(Serialize, ToSchema)]
pub struct DayView {
    #[schema(value_type = String, example = "2026-11-11")]
    day: NaiveDate,
    orders: i64,
    units: i64,
    gross_amount: i64,
    discount_amount: i64,
    paid_amount: i64,
    refunded_amount: i64,
    /// Orders of the day by their status now: `pending_payment`, … `invalid`.
    by_status: std::collections::BTreeMap<&'static str, i64>,
}

impl From<&DailyReport> for DayView {
    fn from(r: &DailyReport) -> Self {
        DayView {
            day: r.day,
            orders: r.orders,
            units: r.units,
            gross_amount: r.gross,
            discount_amount: r.discounts,
            paid_amount: r.paid,
            refunded_amount: r.refunded,
            by_status: OrderStatus::ALL
                .iter()
                .map(|s| (s.name(), r.by_status[s.code() as usize]))
                .collect(),
        }
    }
}

/// A shop's daily report.
#[derive(Serialize, ToSchema)]
pub struct DailyReportView {
    shop_id: ShopId,
    /// Days with orders, oldest first (a day is counted in `merchant.report_utc_offset_minutes`).
    days: Vec<DayView>,
    copy: CopyLag,
}

fn parse_day(
    field: &str,
    v: Option<&String>,
    errors: &mut crate::domain::order::FieldErrors,
) -> Option<NaiveDate> {
    match v.map(|v| NaiveDate::parse_from_str(v, "%Y-%m-%d")) {
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            errors.push(field, "must be a date, YYYY-MM-DD");
            None
        }
        None => {
            errors.push(field, "is required");
            None
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/shops/{shop_id}/reports/daily",
    operation_id = "shop_daily_reports",
    tag = "merchant",
    description = "Orders, units, gross, discounts, paid, refunded and counts by status per day of order creation, kept from the event stream: for the shop's merchant and administrators.",
    params(
        ("shop_id" = ShopId, Path, description = "The shop"),
        ("from" = String, Query, description = "First day, YYYY-MM-DD"),
        ("to" = String, Query, description = "Last day (inclusive), YYYY-MM-DD; at most 366 days after `from`"),
    ),
    responses(
        (status = 200, description = "The days", body = DailyReportView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn daily_reports(
    State(s): State<AppState>,
    Auth(c): Auth,
    PathParam(shop): PathParam,
    QueryMap(params): QueryMap,
) -> ApiResult {
    let shop = shop_id(&shop)?;
    MerchantService::allow(c, shop)?;
    let mut errors = crate::domain::order::FieldErrors::default();
    for k in params.keys() {
        if k != "from" && k != "to" {
            errors.push(k, "is not a parameter of this report");
        }
    }
    let from = parse_day("from", params.get("from"), &mut errors);
    let to = parse_day("to", params.get("to"), &mut errors);
    let (Some(from), Some(to)) = errors.into_result((from, to))? else {
        return Err(crate::domain::order::FieldErrors::single("from", "is required").into());
    };
    let (days, copy) = s.merchant.daily(c, shop, from, to).await?;
    Ok(axum::Json(DailyReportView {
        shop_id: shop,
        days: days.iter().map(DayView::from).collect(),
        copy: copy.into(),
    })
    .into_response())
}
