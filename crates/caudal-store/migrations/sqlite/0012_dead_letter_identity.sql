-- A batch delivered again after a crash is refused again for the same
-- records; dead-lettering looks up a pending letter of the same batch and
-- record first, so each refusal is kept once.
CREATE INDEX dead_letters_by_event ON dead_letters (pipeline, event_id, batch_key);
