-- Run once by the primary's entrypoint, on an empty data directory, after it created the
-- `orderly` user and its first database (MARIADB_USER, MARIADB_DATABASE). These statements
-- go to the binary log, so the replica replays them and holds the same databases and user.
-- `orderly migrate` creates the tables; the databases must exist first.
CREATE DATABASE IF NOT EXISTS orderly_orders0 CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS orderly_commerce CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS orderly_merchant CHARACTER SET utf8mb4;
CREATE DATABASE IF NOT EXISTS orderly_archive CHARACTER SET utf8mb4;
-- Every database of the deployment, and nothing else: no global privilege is needed (GTID
-- positions, MASTER_GTID_WAIT and GET_LOCK take none). On the replica the user therefore
-- lacks READ ONLY ADMIN, so --read-only refuses its writes, as in the test cluster.
GRANT ALL PRIVILEGES ON `orderly\_%`.* TO 'orderly'@'%';
