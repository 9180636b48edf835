-- What baton remembers about a pull request between jobs: the pushes it
-- made to repair it, and what it last reviewed (see store::Note).
CREATE TABLE notes (key text PRIMARY KEY, value jsonb NOT NULL);
