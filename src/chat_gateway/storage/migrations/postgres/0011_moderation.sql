-- Moderation per room. The room's row holds its restrictions (user -> {"until":
-- epoch ms or null, "reason", "by", "at"}) and its slow mode, so that the append
-- statement, which locks that row, checks the latest of them: a post that waits
-- for a ban's commit on the row lock sees the ban (ON CONFLICT DO UPDATE reads the
-- row's newest version), and one that locked it first commits before the ban does.
ALTER TABLE rooms ADD COLUMN banned    jsonb   NOT NULL DEFAULT '{}';
ALTER TABLE rooms ADD COLUMN muted     jsonb   NOT NULL DEFAULT '{}';
ALTER TABLE rooms ADD COLUMN slow_mode integer NOT NULL DEFAULT 0;

-- Rooms where a user is banned (search leaves them out): few rooms have bans.
CREATE INDEX rooms_banned ON rooms USING gin (banned) WHERE banned <> '{}';

-- Whether ``who`` may post under these restrictions now: neither an active ban nor
-- an active mute (an expired one is a time comparison, no job removes it).
CREATE FUNCTION chat_may_post(banned jsonb, muted jsonb, who text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM (VALUES (banned -> who), (muted -> who)) AS v(e)
        WHERE e IS NOT NULL
          AND (e ->> 'until' IS NULL
               OR (e ->> 'until')::bigint > (extract(epoch FROM now()) * 1000)::bigint))
$$;

-- Every ban, unban, mute, unmute and slow-mode change, newest last.
CREATE TABLE moderation_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room       text        NOT NULL,
    action     text        NOT NULL,
    user_name  text,
    by_name    text        NOT NULL,
    reason     text        NOT NULL DEFAULT '',
    until_ms   bigint,
    slow_mode  integer,
    created_at timestamptz NOT NULL
);
CREATE INDEX moderation_log_room ON moderation_log (room, id);
