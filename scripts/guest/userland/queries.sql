-- Queries of the sqlite step of scripts/bench-userland.sh, after insert.sql's 100,000 rows.
CREATE INDEX t_k ON t(k);
SELECT count(*), sum(k), max(length(s)) FROM t;
SELECT k, count(*) FROM t GROUP BY k ORDER BY count(*) DESC, k LIMIT 3;
SELECT count(*) FROM t a JOIN t b ON a.k = b.k WHERE a.id < 300 AND b.id < 30000;
SELECT sum(id) FROM t WHERE s LIKE '%-ff%';
UPDATE t SET k = k + 1 WHERE id % 3 = 0;
SELECT k, sum(id) FROM t WHERE k BETWEEN 100 AND 110 GROUP BY k ORDER BY k;
