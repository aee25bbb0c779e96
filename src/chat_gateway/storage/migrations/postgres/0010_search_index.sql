-- migrate: no transaction
-- Full-text search, part two, run statement by statement outside a transaction
-- (CREATE INDEX CONCURRENTLY refuses to run in one; posts and reads go on
-- meanwhile). A run cut short is simply run again: the fill skips filled rows,
-- and an index left invalid by a failed build is dropped and built again.
CALL messages_search_fill(10000, false);
DROP INDEX CONCURRENTLY IF EXISTS messages_search;
CREATE INDEX CONCURRENTLY messages_search ON messages USING gin (search);
