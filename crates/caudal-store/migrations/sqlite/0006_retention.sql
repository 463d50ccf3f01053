-- Bounded history: what pruning needs to stay cheap on a big table, and the
-- time of the last idle poll.
--
-- Runs are pruned per pipeline through `runs_by_pipeline`, which exists
-- already. Resolved dead letters are pruned by when they were resolved;
-- pending ones (resolved_at IS NULL) are never pruned and stay out of this
-- index. Audit entries are pruned by when they were written.
CREATE INDEX dead_letters_by_resolution ON dead_letters (resolved_at)
    WHERE resolved_at IS NOT NULL;

CREATE INDEX audit_log_by_time ON audit_log (at);

-- A poll of a continuous schedule that found nothing leaves no run behind;
-- its end time is kept here instead, so an idle pipeline still shows that
-- it polls.
ALTER TABLE schedules ADD COLUMN last_idle_poll_at INTEGER;
