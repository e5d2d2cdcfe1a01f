-- Every LLMux worker caches keys (hashed key -> principal) and LISTENs on `llmux_auth`:
-- these triggers name what changed, whoever changes it (LLMux's management API, a LiteLLM
-- proxy on the same database, psql), so a revoked or updated key stops working at once
-- rather than at the next periodic re-read (docs/architecture.md, Keys, limits and budgets).
-- Payloads: 'k:<token hash>', 't:<team_id>', 'u:<user_id>', 'b:<budget_id>'. Updates fire
-- only when a column that decides admission changes: spend columns change on every request
-- LiteLLM serves and must not flush caches.

CREATE OR REPLACE FUNCTION llmux_notify_auth() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    prefix text := TG_ARGV[0];
    id_column text := TG_ARGV[1];
    old_id text;
    new_id text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_id := to_jsonb(OLD) ->> id_column;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        new_id := to_jsonb(NEW) ->> id_column;
    END IF;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('llmux_auth', prefix || ':' || new_id);
    END IF;
    -- A key re-hashed by LiteLLM's /key/regenerate: the old hash must go as well.
    IF old_id IS NOT NULL AND old_id IS DISTINCT FROM new_id THEN
        PERFORM pg_notify('llmux_auth', prefix || ':' || old_id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS llmux_auth_insert_delete ON "LiteLLM_VerificationToken";
CREATE TRIGGER llmux_auth_insert_delete
    AFTER INSERT OR DELETE ON "LiteLLM_VerificationToken"
    FOR EACH ROW EXECUTE FUNCTION llmux_notify_auth('k', 'token');
DROP TRIGGER IF EXISTS llmux_auth_update ON "LiteLLM_VerificationToken";
CREATE TRIGGER llmux_auth_update
    AFTER UPDATE ON "LiteLLM_VerificationToken"
    FOR EACH ROW WHEN (
        OLD.token IS DISTINCT FROM NEW.token
        OR OLD.models IS DISTINCT FROM NEW.models
        OR OLD.blocked IS DISTINCT FROM NEW.blocked
        OR OLD.expires IS DISTINCT FROM NEW.expires
        OR OLD.team_id IS DISTINCT FROM NEW.team_id
        OR OLD.user_id IS DISTINCT FROM NEW.user_id
        OR OLD.key_alias IS DISTINCT FROM NEW.key_alias
        OR OLD.rpm_limit IS DISTINCT FROM NEW.rpm_limit
        OR OLD.tpm_limit IS DISTINCT FROM NEW.tpm_limit
        OR OLD.max_parallel_requests IS DISTINCT FROM NEW.max_parallel_requests
        OR OLD.max_budget IS DISTINCT FROM NEW.max_budget
        OR OLD.budget_duration IS DISTINCT FROM NEW.budget_duration
        OR OLD.budget_id IS DISTINCT FROM NEW.budget_id
        OR OLD.aliases IS DISTINCT FROM NEW.aliases
        OR OLD.metadata IS DISTINCT FROM NEW.metadata
    )
    EXECUTE FUNCTION llmux_notify_auth('k', 'token');

DROP TRIGGER IF EXISTS llmux_auth_insert_delete ON "LiteLLM_TeamTable";
CREATE TRIGGER llmux_auth_insert_delete
    AFTER INSERT OR DELETE ON "LiteLLM_TeamTable"
    FOR EACH ROW EXECUTE FUNCTION llmux_notify_auth('t', 'team_id');
DROP TRIGGER IF EXISTS llmux_auth_update ON "LiteLLM_TeamTable";
CREATE TRIGGER llmux_auth_update
    AFTER UPDATE ON "LiteLLM_TeamTable"
    FOR EACH ROW WHEN (
        OLD.team_id IS DISTINCT FROM NEW.team_id
        OR OLD.team_alias IS DISTINCT FROM NEW.team_alias
        OR OLD.models IS DISTINCT FROM NEW.models
        OR OLD.blocked IS DISTINCT FROM NEW.blocked
        OR OLD.rpm_limit IS DISTINCT FROM NEW.rpm_limit
        OR OLD.tpm_limit IS DISTINCT FROM NEW.tpm_limit
        OR OLD.max_parallel_requests IS DISTINCT FROM NEW.max_parallel_requests
        OR OLD.max_budget IS DISTINCT FROM NEW.max_budget
        OR OLD.soft_budget IS DISTINCT FROM NEW.soft_budget
        OR OLD.budget_duration IS DISTINCT FROM NEW.budget_duration
        OR OLD.metadata IS DISTINCT FROM NEW.metadata
    )
    EXECUTE FUNCTION llmux_notify_auth('t', 'team_id');

DROP TRIGGER IF EXISTS llmux_auth_insert_delete ON "LiteLLM_UserTable";
CREATE TRIGGER llmux_auth_insert_delete
    AFTER INSERT OR DELETE ON "LiteLLM_UserTable"
    FOR EACH ROW EXECUTE FUNCTION llmux_notify_auth('u', 'user_id');
DROP TRIGGER IF EXISTS llmux_auth_update ON "LiteLLM_UserTable";
CREATE TRIGGER llmux_auth_update
    AFTER UPDATE ON "LiteLLM_UserTable"
    FOR EACH ROW WHEN (
        OLD.user_id IS DISTINCT FROM NEW.user_id
        OR OLD.models IS DISTINCT FROM NEW.models
        OR OLD.rpm_limit IS DISTINCT FROM NEW.rpm_limit
        OR OLD.tpm_limit IS DISTINCT FROM NEW.tpm_limit
        OR OLD.max_parallel_requests IS DISTINCT FROM NEW.max_parallel_requests
        OR OLD.max_budget IS DISTINCT FROM NEW.max_budget
        OR OLD.budget_duration IS DISTINCT FROM NEW.budget_duration
    )
    EXECUTE FUNCTION llmux_notify_auth('u', 'user_id');

DROP TRIGGER IF EXISTS llmux_auth_update_delete ON "LiteLLM_BudgetTable";
CREATE TRIGGER llmux_auth_update_delete
    AFTER UPDATE OR DELETE ON "LiteLLM_BudgetTable"
    FOR EACH ROW EXECUTE FUNCTION llmux_notify_auth('b', 'budget_id');
