//! `orderly-dev playground` (`cargo playground`): a throwaway local cluster (two MariaDB servers holding 16 table
//! shards each plus the commerce database, one GTID replica of each, and Redis) from the binaries on PATH, migrated,
//! with a demo catalog, serving the API. It prints tokens and curl lines that work as
//! printed, and removes everything on Ctrl-C.

use std::path::Path;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use orderly::app::Application;
use orderly::config::Settings;
use orderly::domain::actor::{Caller, Role};
use orderly::domain::ids::{ShopId, UserId};
use orderly::http::auth::AuthKeys;
use orderly::service::catalog::{
    CatalogService, NewCouponRequest, NewProductRequest, NewShopRequest, NewUserRequest,
};

use crate::cluster::ClusterSpec;
use crate::fixtures::{write_old_orders, OldOrders};
use crate::raw::RawDb;
use crate::stack::{self, PoolFit, Stack, StackSpec};

/// The demo flash sale: one "Flash-sale phone" at 599.00 for a day, one per buyer, already
/// sold to the second demo buyer, so the printed line shows a sold-out answer at once.
pub struct DemoFlashSale {
    pub sale_id: String,
    pub product_id: String,
}

pub async fn start_demo_flash_sale(
    state: &orderly::http::AppState,
    demo: &DemoCatalog,
) -> anyhow::Result<DemoFlashSale> {
    let admin = Caller::Admin(UserId::new(1).unwrap_or_else(|| unreachable!()));
    let product_id = demo.product_ids[2].clone();
    let now = Utc::now();
    let sale = state
        .orders
        .flash()
        .create(
            admin,
            orderly::domain::flash::NewFlashSaleRequest {
                product_id: product_id.clone(),
                units: 1,
                sale_price: 59_900,
                per_user_limit: 1,
                starts_at: now - TimeDelta::seconds(1),
                ends_at: now + TimeDelta::days(1),
                payment_timeout_secs: 600,
            },
        )
        .await?;
    let buyer = UserId::new(1002).unwrap_or_else(|| unreachable!());
    let order_id = state.ids.next_for(buyer)?;
    let request: orderly::domain::order::CreateOrderRequest = serde_json::from_value(serde_json::json!({
        "order_id": order_id.to_string(),
        "items": [{"product_id": product_id, "quantity": 1}],
        "address": {"name": "Han Meimei", "phone": "13900000000", "detail": "2 Century Avenue, Shanghai"},
    }))?;
    state.orders.create(Caller::User(buyer), request).await?;
    Ok(DemoFlashSale {
        sale_id: sale.sale_id.to_string(),
        product_id,
    })
}

/// The demo catalog: what the printed curl lines use.
pub struct DemoCatalog {
    pub buyer: UserId,
    pub shop: ShopId,
    pub product_ids: Vec<String>,
    pub first_price: i64,
    pub coupon_id: String,
}

pub async fn load_demo_catalog(catalog: &CatalogService) -> anyhow::Result<DemoCatalog> {
    let admin = Caller::Admin(UserId::new(1).unwrap_or_else(|| unreachable!()));
    catalog
        .create_user(
            admin,
            NewUserRequest {
                user_id: Some("1".into()),
                name: "Admin".into(),
                level: 0,
            },
        )
        .await?;
    let buyer = catalog
        .create_user(
            admin,
            NewUserRequest {
                user_id: Some("1001".into()),
                name: "Li Lei".into(),
                level: 3,
            },
        )
        .await?;
    catalog
        .create_user(
            admin,
            NewUserRequest {
                user_id: Some("1002".into()),
                name: "Han Meimei".into(),
                level: 1,
            },
        )
        .await?;
    let shop = catalog
        .create_shop(
            admin,
            NewShopRequest {
                name: "Demo Shop".into(),
            },
        )
        .await?;
    let mut product_ids = Vec::new();
    let products = [
        ("Mechanical keyboard", 39_900, 100),
        ("USB-C cable", 1_999, 1_000),
        ("Flash-sale phone", 99_900, 10),
    ];
    for (name, price, stock) in products {
        let p = catalog
            .create_product(
                admin,
                NewProductRequest {
                    shop_id: shop.shop_id.to_string(),
                    name: name.into(),
                    price,
                    currency: None,
                    stock,
                },
            )
            .await?;
        product_ids.push(p.product_id.to_string());
    }
    let coupon = catalog
        .issue_coupon(
            admin,
            NewCouponRequest {
                user_id: buyer.user_id.to_string(),
                shop_id: Some(shop.shop_id.to_string()),
                amount: 5_000,
                min_spend: 20_000,
                valid_from: None,
                valid_to: Utc::now() + TimeDelta::days(30),
                currency: None,
            },
        )
        .await?;
    Ok(DemoCatalog {
        buyer: buyer.user_id,
        shop: shop.shop_id,
        product_ids,
        first_price: products[0].1,
        coupon_id: coupon.coupon_id.to_string(),
    })
}

/// Old orders of the demo buyer (every second one) and the other buyer, 100 to 200 days old,
/// most of them final: what `orderly archive` moves in the playground. Written through
/// storage, since the API refuses ids older than a day. Answers how many, and the demo
/// buyer's ids.
async fn write_demo_old_orders(
    state: &orderly::http::AppState,
    db: &RawDb,
    demo: &DemoCatalog,
) -> anyhow::Result<(usize, Vec<orderly::domain::ids::OrderId>)> {
    use orderly::domain::status::OrderStatus::*;
    let other = UserId::new(1002).unwrap_or_else(|| unreachable!());
    let mut products = Vec::new();
    for id in &demo.product_ids[..2] {
        let id = orderly::domain::ids::ProductId::parse(id)
            .ok_or_else(|| anyhow::anyhow!("bad demo product id {id}"))?;
        let p = state.catalog.get_product(id).await?;
        products.push((p.product_id, p.name, p.price));
    }
    let spec = OldOrders {
        users: vec![demo.buyer, other],
        shop: demo.shop,
        products,
        count: 1000,
        newest_age: TimeDelta::days(100),
        // An odd cycle, so both buyers get every status.
        statuses: vec![Completed, Closed, Completed, Invalid, Shipped],
    };
    let ids = write_old_orders(db, &spec).await?;
    Ok((ids.len(), ids.into_iter().step_by(2).collect()))
}

pub async fn run(config: Option<&Path>, port: u16) -> anyhow::Result<()> {
    println!(
        "starting a local cluster (2 MariaDB primaries with a replica each, Redis) from the binaries on PATH ..."
    );
    let mut base = match config {
        Some(_) => Settings::load(config).unwrap_or_else(|_| Settings::defaults()),
        None => Settings::defaults(),
    };
    base.auth.jwt_secret =
        (uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string()).into();
    base.server.listen = ([127, 0, 0, 1], port).into();
    // The playground's service and a command run beside it with the settings written below
    // (`orderly archive`) fit into every server's max_connections together, whatever pool
    // size a given config asks for.
    let wanted = base.database.max_connections;
    let Stack {
        cluster,
        settings,
        migrations: report,
    } = stack::start(
        ClusterSpec {
            mariadb_servers: 2,
            replicas_per_server: 1,
            tls: false,
            with_redis: true,
            with_nats: true,
            base_dir: None,
            durable: false,
        },
        StackSpec {
            base,
            db_prefix: "orderly_".into(),
            shards: 32,
            pool_fit: Some(PoolFit { processes: 2, wanted }),
        },
        |_| {},
    )
    .await?;
    println!("migrated: {} migrations applied", report.applied.len());

    let token = CancellationToken::new();
    let app = Application::build(settings.clone(), token.clone()).await?;
    let demo = load_demo_catalog(&app.state().catalog).await?;
    let flash = start_demo_flash_sale(app.state(), &demo).await?;
    let old = write_demo_old_orders(app.state(), &RawDb::connect(&settings).await?, &demo).await?;
    // The settings of this cluster, for the commands run beside it (`orderly archive`).
    let config_file = cluster.dir().join("orderly.toml");
    std::fs::write(&config_file, toml::to_string(&settings)?)?;
    let keys = AuthKeys::new(&settings.auth);
    let day = Duration::from_secs(24 * 3600);
    let user_token = keys.issue(&demo.buyer.to_string(), Role::User, None, day);
    let merchant_token = keys.issue("2001", Role::Merchant, Some(demo.shop), day);
    let service_token = keys.issue("0", Role::Service, None, day);
    let admin_token = keys.issue("1", Role::Admin, None, day);
    let base_url = format!("http://{}", app.address());
    let amount = demo.first_price * 2;
    println!(
        r#"
orderly playground is serving at {base_url}   (Ctrl-C stops it and removes the cluster)

Tokens (valid 24 h):
  export USER_TOKEN={user_token}
  export MERCHANT_TOKEN={merchant_token}
  export SERVICE_TOKEN={service_token}
  export ADMIN_TOKEN={admin_token}

Demo catalog: shop {shop}, products {products}, buyer {buyer}, coupon {coupon} (50.00 off 200.00).

Try it (after the exports above):
  # 1. get a fresh order id
  ID=$(curl -s -X POST {base_url}/v1/order-ids -H "Authorization: Bearer $USER_TOKEN" | sed 's/.*"order_id":"\([0-9]*\)".*/\1/'); echo $ID
  # 2. create the order (run it twice: the second answer is 200 with the same order)
  curl -s -X POST {base_url}/v1/orders -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"order_id":"'$ID'","items":[{{"product_id":"{p0}","quantity":2}}],"address":{{"name":"Li Lei","phone":"13800000000","detail":"1 Century Avenue, Shanghai"}}}}'
  # 3. the payment channel reports the payment ({amount} = 2 x {price})
  curl -s -X POST {base_url}/v1/orders/$ID/payments -H "Authorization: Bearer $SERVICE_TOKEN" -H 'Content-Type: application/json' -d '{{"transaction_no":"demo-'$ID'","channel":"alipay","amount":{amount}}}'
  # 4. the shop ships it (version 2 after the payment)
  curl -s -X POST {base_url}/v1/orders/$ID/shipment -H "Authorization: Bearer $MERCHANT_TOKEN" -H 'Content-Type: application/json' -d '{{"expected_version":2,"carrier":"SF Express","tracking_number":"SF1234567890"}}'
  # 5. read it back, and list my orders: Served-By says who answered (cache, replica or
  #    primary); every write answered a Consistency-Token that a read on any connection may
  #    send back to see that write
  curl -s -i {base_url}/v1/orders/$ID -H "Authorization: Bearer $USER_TOKEN"
  curl -s -i {base_url}/v1/orders -H "Authorization: Bearer $USER_TOKEN"
  # 6. a page the cache does not hold: a replica answers (add &consistency=strong for the primary)
  curl -s -i "{base_url}/v1/orders?limit=50" -H "Authorization: Bearer $USER_TOKEN"
  # 7. flash sale {sale} (1 phone at 599.00, sold already): the Redis gate answers 409 out_of_stock
  FID=$(curl -s -X POST {base_url}/v1/order-ids -H "Authorization: Bearer $USER_TOKEN" | sed 's/.*"order_id":"\([0-9]*\)".*/\1/')
  curl -s -X POST {base_url}/v1/orders -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"order_id":"'$FID'","items":[{{"product_id":"{flash_product}","quantity":1}}],"address":{{"name":"Li Lei","phone":"13800000000","detail":"1 Century Avenue, Shanghai"}}}}'
  curl -s {base_url}/v1/flash-sales/{sale} -H "Authorization: Bearer $ADMIN_TOKEN"
  # 8. the merchant's view: the shop's orders from the copy by shop, fed by the event stream
  #    through NATS JetStream ("copy" says how far behind it is), and today's report
  curl -s "{base_url}/v1/shops/{shop}/orders?limit=5" -H "Authorization: Bearer $MERCHANT_TOKEN"
  curl -s "{base_url}/v1/shops/{shop}/reports/daily?from={today}&to={today}" -H "Authorization: Bearer $MERCHANT_TOKEN"
  #    and search (an embedded index fed by the same stream): by product name or tracking
  #    number; the buyer finds only their own orders, the merchant only its shop's
  curl -s "{base_url}/v1/search/orders?q=keyboard" -H "Authorization: Bearer $USER_TOKEN"
  curl -s "{base_url}/v1/search/orders?q=SF1234567890" -H "Authorization: Bearer $MERCHANT_TOKEN"
  # 9. the cart (Redis, written behind to MySQL within a second): add two products, read it
  #    with today's prices, price it, and check out of it; the order's lines leave the cart
  curl -s -X PUT {base_url}/v1/cart/items/{p0} -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"quantity":1}}'
  curl -s -X PUT {base_url}/v1/cart/items/{p1} -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"quantity":2}}'
  curl -s {base_url}/v1/cart -H "Authorization: Bearer $USER_TOKEN"
  curl -s -X POST {base_url}/v1/orders/preview -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"from_cart":true}}'
  CID=$(curl -s -X POST {base_url}/v1/order-ids -H "Authorization: Bearer $USER_TOKEN" | sed 's/.*"order_id":"\([0-9]*\)".*/\1/')
  curl -s -X POST {base_url}/v1/orders -H "Authorization: Bearer $USER_TOKEN" -H 'Content-Type: application/json' -d '{{"order_id":"'$CID'","from_cart":true,"address":{{"name":"Li Lei","phone":"13800000000","detail":"1 Century Avenue, Shanghai"}}}}'
  curl -s {base_url}/v1/cart -H "Authorization: Bearer $USER_TOKEN"
  # 10. the archive: {old} orders of 100 to 200 days ago (half of them the demo buyer's)
  #    were written straight into the shards (the API takes no old ids); count what a pass would move, move it (with an
  #    export), then read an old order back from the archive (Served-By: archive)
  orderly --config {config} archive --dry-run
  orderly --config {config} archive --batch-size 200 --export-dir {export}
  curl -s -i "{base_url}/v1/orders/{old_id}?consistency=strong" -H "Authorization: Bearer $USER_TOKEN"
"#,
        old = old.0,
        old_id = old.1.first().map(|i| i.to_string()).unwrap_or_default(),
        config = config_file.display(),
        export = cluster.dir().join("archive-export").display(),
        shop = demo.shop,
        products = demo.product_ids.join(", "),
        buyer = demo.buyer,
        coupon = demo.coupon_id,
        p0 = demo.product_ids[0],
        p1 = demo.product_ids.get(1).unwrap_or(&demo.product_ids[0]),
        price = demo.first_price,
        sale = flash.sale_id,
        flash_product = flash.product_id,
        today = (chrono::Utc::now()
            + chrono::TimeDelta::minutes(i64::from(settings.merchant.report_utc_offset_minutes)))
        .date_naive(),
    );
    let stop = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        println!("\nstopping ...");
        stop.cancel();
    });
    app.run().await?;
    drop(cluster);
    println!("playground stopped; cluster removed");
    Ok(())
}
