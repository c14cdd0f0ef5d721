-- immuta finalize: objects that depend on the functions.

-- One row per data key, without the wrapped key bytes.
CREATE VIEW immuta.keys AS
SELECT k.id,
       k.created_at,
       k.provider,
       k.wrapping_key,
       k.wrapping_region,
       k.reason,
       k.created_by,
       k.id = c.current_id AS is_current,
       CASE WHEN k.id = c.current_id
            THEN k.created_at + make_interval(secs => immuta.rollover_length_days() * 86400.0)
       END AS rollover_due_at,
       immuta.encryptions_counted(k.id) AS encryptions,
       CASE WHEN k.id = c.current_id THEN immuta.max_encryptions_per_key() END AS max_encryptions
FROM immuta.data_keys k
CROSS JOIN (SELECT max(id) AS current_id FROM immuta.data_keys) c;
COMMENT ON VIEW immuta.keys IS 'immuta data keys: which encrypts now, when it rolls over, how much it was used';

-- Emptying the cluster's key cache forces KMS calls in every database: not for PUBLIC. (The
-- complete role model, immuta_admin and friends, comes with the security milestone.)
REVOKE EXECUTE ON FUNCTION immuta_cache_reset() FROM PUBLIC;
-- Registering jobs with pg_cron is an administrator's decision (pg_cron itself revokes
-- cron.schedule_in_database from PUBLIC).
REVOKE EXECUTE ON FUNCTION immuta_schedule_rotation(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION immuta_unschedule_rotation() FROM PUBLIC;
