//! The one-door test: only `src/storage/orders/commit.rs` writes orders.
//!
//! # The rule
//! No `.rs` file under `src/` other than the door holds SQL that inserts, updates or deletes
//! rows of an order table, or inserts an order event. The test reads every file and fails,
//! naming file and line, on any such statement.
//!
//! # How a statement is recognised
//! Comment lines (`//`, `///`, `//!`) are skipped. A write is a keyword, in any case, followed
//! by its target table: `INSERT [IGNORE] [INTO] t`, `REPLACE [INTO] t`, `UPDATE t` (not the
//! `UPDATE` of `ON DUPLICATE KEY UPDATE`) and `DELETE FROM t`, across line breaks, as the
//! SQL of this crate is written (in `sqlx::query("…")` or in `format!("…", …)`). The target
//! is an order table when it is:
//! - a literal name: `orders`, `orders_NN`, `order_items[_NN]`, `order_payments[_NN]`,
//!   `order_discounts[_NN]`, `order_voids[_NN]`, `archived_orders`, and for an insert
//!   `order_outbox`;
//! - a `{NAME}` placeholder naming a `const NAME: &str = "…"` of the same file whose value is
//!   one of those (`outbox::TABLE` is `order_outbox`);
//! - a `{}` placeholder whose `format!` arguments mention a `ShardTables` field of an order
//!   table (`.orders`, `.items`, `.payments`, `.discounts`, `.voids`), an order table by
//!   name, or `outbox::TABLE`;
//! - a `{name}` placeholder whose binding does: its `name = …` format argument, or the
//!   nearest `let name = …` or `for name in […]` above it (`for table in [&t.items, …]`); one
//!   bound nowhere in sight (a parameter) is judged by the lines around it.
//!
//! Not order writes: moving an event already written between the outbox and its parking
//! table (an insert selecting `FROM` the parked table, `storage/outbox.rs`'s unpark: the
//! relay consumes events, it does not write them), deletes of relayed outbox rows, schema
//! migrations, and the merchant copy (other tables).
//!
//! The harness (`crates/orderly-testkit`) is another crate and is not scanned: its benches
//! write order rows by hand for their raw baselines, on pools of their own.

use std::path::{Path, PathBuf};

/// The one file allowed to write orders.
const DOOR: &str = "src/storage/orders/commit.rs";

/// `ShardTables` fields naming order tables.
const FIELDS: &[&str] = &["orders", "items", "payments", "discounts", "voids"];

/// Lines before the keyword and after it that belong to its statement's format arguments.
const BEFORE: usize = 4;
const AFTER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Insert,
    Update,
    Delete,
}

fn is_order_table(name: &str, write: Write) -> bool {
    let name = name.trim_matches('`');
    let name = name.rsplit('.').next().unwrap_or(name);
    let base = match name.rsplit_once('_') {
        Some((b, n)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => b,
        _ => name,
    };
    let base = base.to_ascii_lowercase();
    matches!(
        base.as_str(),
        "orders" | "order_items" | "order_payments" | "order_discounts" | "order_voids" | "archived_orders"
    ) || (write == Write::Insert && base == "order_outbox")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `text` mentions an order table: a `ShardTables` field, a name, `outbox::TABLE`.
fn mentions_order_table(text: &str, write: Write) -> bool {
    for field in FIELDS {
        let pat = format!(".{field}");
        let mut from = 0;
        while let Some(i) = text[from..].find(&pat) {
            let at = from + i;
            let before = text[..at].chars().next_back();
            let after = text[at + pat.len()..].chars().next();
            if before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
                return true;
            }
            from = at + pat.len();
        }
    }
    if write == Write::Insert && text.contains("outbox::TABLE") {
        return true;
    }
    text.split(|c: char| !is_ident(c))
        .any(|w| w.contains('_') && is_order_table(w, write))
}

/// The `const NAME: &str = "value";` of a file.
fn consts(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in source.lines() {
        let l = line.trim_start();
        let l = l.strip_prefix("pub ").unwrap_or(l);
        let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
        let Some(rest) = l.strip_prefix("const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((_, value)) = rest.split_once('"') else {
            continue;
        };
        let Some((value, _)) = value.split_once('"') else {
            continue;
        };
        out.push((name.trim().to_owned(), value.to_owned()));
    }
    out
}

/// One token of a file's code (comments dropped), with its line (0-based).
struct Token {
    text: String,
    line: usize,
}

fn tokens(lines: &[&str]) -> Vec<Token> {
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        // Split on whitespace and on the quotes and brackets around SQL text, keeping
        // `{…}` placeholders whole.
        let mut cur = String::new();
        let mut depth = 0;
        for c in line.chars() {
            let sep = depth == 0 && (c.is_whitespace() || matches!(c, '"' | '(' | ')' | ',' | ';'));
            if c == '{' {
                depth += 1;
            }
            if c == '}' && depth > 0 {
                depth -= 1;
            }
            if sep {
                if !cur.is_empty() {
                    out.push(Token {
                        text: std::mem::take(&mut cur),
                        line: n,
                    });
                }
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(Token { text: cur, line: n });
        }
    }
    out
}

/// Every order write in `source`: (line, 1-based; the statement's line).
fn order_writes(source: &str, allow_outbox_moves: bool) -> Vec<(usize, String)> {
    let lines: Vec<&str> = source.lines().collect();
    let consts = consts(source);
    let toks = tokens(&lines);
    let mut found = Vec::new();
    for (i, tok) in toks.iter().enumerate() {
        let word = tok.text.to_ascii_uppercase();
        let next = |k: usize| toks.get(i + k).map(|t| t.text.to_ascii_uppercase());
        let (write, mut at) = match word.as_str() {
            "INSERT" | "REPLACE" => (Write::Insert, i + 1),
            "UPDATE" => {
                let prev = i.checked_sub(1).map(|p| toks[p].text.to_ascii_uppercase());
                // `ON DUPLICATE KEY UPDATE`, `SELECT … FOR UPDATE`.
                if matches!(prev.as_deref(), Some("KEY" | "FOR")) {
                    continue;
                }
                (Write::Update, i + 1)
            }
            "DELETE" if next(1).as_deref() == Some("FROM") => (Write::Delete, i + 2),
            _ => continue,
        };
        // Modifiers between the keyword and the table.
        while let Some(t) = toks.get(at) {
            match t.text.to_ascii_uppercase().as_str() {
                "INTO" | "IGNORE" | "LOW_PRIORITY" | "DELAYED" | "HIGH_PRIORITY" => at += 1,
                _ => break,
            }
        }
        let Some(target) = toks.get(at) else { continue };
        let target = target.text.as_str();
        let plain = |c: char| is_ident(c) || c == '`' || c == '.';
        let is_write_sql = target.starts_with('{') || (!target.is_empty() && target.chars().all(plain));
        if !is_write_sql || (write == Write::Update && !statement_has_set(&toks[at..])) {
            continue;
        }
        let hit = match target.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            None => is_order_table(target, write),
            Some(inner) => match consts.iter().find(|(name, _)| name == inner) {
                Some((_, value)) => is_order_table(value, write),
                None if inner.is_empty() => mentions_order_table(&format_args(&lines, tok.line), write),
                None => mentions_order_table(&binding(&lines, tok.line, inner), write),
            },
        };
        if !hit {
            continue;
        }
        // The relay putting a parked event back: a move of a written event, not a write.
        let statement = lines[tok.line..=(tok.line + 2).min(lines.len() - 1)].join("\n");
        if allow_outbox_moves
            && write == Write::Insert
            && (statement.contains("{PARKED}") || statement.contains("order_outbox_parked"))
        {
            continue;
        }
        found.push((tok.line + 1, lines[tok.line].trim().to_owned()));
    }
    found
}

/// The text of a statement's format arguments: from its keyword's line to the end of the
/// `format!` call, i.e. before the first line that starts a method chain (`.bind(…)`) or ends
/// a statement (`;`), at most [`AFTER`] lines.
fn format_args(lines: &[&str], at: usize) -> String {
    let mut out = vec![lines[at]];
    for line in lines.iter().skip(at + 1).take(AFTER) {
        if line.trim_start().starts_with('.') {
            break;
        }
        out.push(line);
        if line.contains(';') {
            break;
        }
    }
    out.join("\n")
}

/// What the placeholder `{name}` stands for: its `let name =` or `for name in` line (up to
/// [`BEFORE`] lines of loops or bindings back, searched up to 80 lines) or its `name = …`
/// format argument. Unknown (a parameter): the whole neighbourhood, to stay on the safe side.
fn binding(lines: &[&str], at: usize, name: &str) -> String {
    let args = format_args(lines, at);
    let arg = format!("{name} =");
    let mut from = 0;
    while let Some(i) = args[from..].find(&arg) {
        let at = from + i;
        let named = !args[..at].chars().next_back().is_some_and(is_ident);
        if named && !args[at + arg.len()..].starts_with('=') {
            return args[at..].lines().next().unwrap_or("").to_owned();
        }
        from = at + arg.len();
    }
    let forms = [
        format!("let {name} ="),
        format!("let mut {name} ="),
        format!("for {name} in"),
    ];
    for line in lines[at.saturating_sub(80)..at].iter().rev() {
        if forms.iter().any(|f| line.contains(f.as_str())) {
            return (*line).to_owned();
        }
    }
    let first = at.saturating_sub(BEFORE);
    let last = (at + AFTER).min(lines.len() - 1);
    lines[first..=last].join("\n")
}

/// An `UPDATE t` of SQL has a `SET` soon after (a Rust `update` word does not).
fn statement_has_set(rest: &[Token]) -> bool {
    rest.iter().take(6).any(|t| t.text.eq_ignore_ascii_case("SET"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `.rs` file under `src/`, by path from the root (`src/…`), with its text, in path
/// order.
fn sources(root: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&path).expect("read a source file"))
        })
        .collect()
}

#[test]
fn only_the_door_writes_order_rows_or_events() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = sources(root);
    assert!(files.len() > 20, "found only {} files under src/", files.len());
    let mut door_writes = 0;
    let mut violations = Vec::new();
    for (rel, source) in files {
        let writes = order_writes(&source, rel == "src/storage/outbox.rs");
        if rel == DOOR {
            door_writes = writes.len();
            continue;
        }
        for (line, text) in writes {
            violations.push(format!("{rel}:{line}: {text}"));
        }
    }
    assert!(
        violations.is_empty(),
        "order rows or events written outside the door ({DOOR}):\n{}",
        violations.join("\n")
    );
    // The matcher still sees the door's own statements (a matcher that finds nothing would
    // pass everything).
    assert!(
        door_writes >= 10,
        "the door's writes not recognised: {door_writes}"
    );
}

#[test]
fn the_matcher_catches_the_forms_the_crate_writes_sql_in() {
    let caught = [
        "sqlx::query(AssertSqlSafe(format!(\n    \"UPDATE {} {BY_PRIMARY} SET status = ?\",\n    t.orders\n)))",
        "let sql = format!(\n  \"INSERT INTO {} (order_id, line_no) VALUES {placeholders}\",\n  t.items\n);",
        "for table in [&t.items, &t.payments] {\n    let sql = format!(\"DELETE FROM {table} WHERE order_id IN ({list})\");\n}",
        "sqlx::query(\"UPDATE archived_orders SET doc = ? WHERE order_id = ?\")",
        "sqlx::query(\"delete from order_voids_03 where order_id = ?\")",
        "const TABLE: &str = \"order_outbox\";\nformat!(\"INSERT INTO {TABLE} (order_id) VALUES (?)\")",
        "format!(\"INSERT INTO {} (order_id) VALUES (?)\", outbox::TABLE)",
        "format!(\"REPLACE INTO {} (order_id) VALUES (?)\", tables.discounts)",
        "sqlx::query(\"INSERT IGNORE INTO orders_01 (order_id) VALUES (?)\")",
    ];
    for sql in caught {
        assert_eq!(order_writes(sql, false).len(), 1, "not caught:\n{sql}");
    }
    let passed = [
        "sqlx::query(\"UPDATE carts SET items = ? WHERE user_id = ?\")",
        "\"INSERT INTO flash_sales (product_id) VALUES (?) ON DUPLICATE KEY UPDATE units = 1\"",
        "format!(\"DELETE FROM {TABLE} WHERE id IN ({placeholders})\")\nconst TABLE: &str = \"order_outbox\";",
        "format!(\"INSERT INTO {t} (order_id, shop_id) VALUES (?, ?)\", t = m.name)",
        "format!(\"SELECT order_id FROM {} WHERE status = ? FOR UPDATE\", t.orders)",
        "// UPDATE orders_00 SET status = 1",
        "format!(\"SELECT 1 FROM {} WHERE order_id = ? FOR UPDATE\", t.orders); \"SET x\"",
        "Method::DELETE => \"DELETE\",",
    ];
    for sql in passed {
        assert_eq!(order_writes(sql, false), Vec::new(), "caught:\n{sql}");
    }
    let unpark = "const TABLE: &str = \"order_outbox\";\nformat!(\n  \"INSERT INTO {TABLE} ({COLUMNS}) SELECT {COLUMNS} FROM {PARKED} WHERE id <= ?\"\n)";
    assert_eq!(order_writes(unpark, true), Vec::new());
    assert_eq!(order_writes(unpark, false).len(), 1);
}

/// Where a transaction is begun other than through `storage::pool` (whose `begin` and
/// `begin_raw` mark the connection, so that one cut off inside a transaction is closed, not
/// reused): `file:line` of each.
fn transactions_begun_around_the_pool(root: &Path) -> Vec<String> {
    let forms = [
        "Connection::begin(",
        ".begin().await",
        ".begin_with(",
        "\"BEGIN\"",
        "START TRANSACTION",
        "autocommit",
    ];
    let mut found = Vec::new();
    for (rel, source) in sources(root) {
        if rel == "src/storage/pool.rs" {
            continue;
        }
        for (i, line) in source.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if forms.iter().any(|f| code.contains(f)) {
                found.push(format!("{rel}:{}: {}", i + 1, code));
            }
        }
    }
    found
}

#[test]
fn every_transaction_is_begun_through_the_pool_guard() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = transactions_begun_around_the_pool(root);
    assert!(
        found.is_empty(),
        "transactions begun around storage::pool::begin (a connection cut off inside one \
         would be reused):\n{}",
        found.join("\n")
    );
    // The scan sees the guard's own forms (a scan that finds nothing would pass everything).
    let pool = std::fs::read_to_string(root.join("src/storage/pool.rs")).expect("read pool.rs");
    assert!(pool.contains("sqlx::Connection::begin(") && pool.contains("\"BEGIN\""));
}
