-- Directory tables: clinics (the tenants), staff users and their clinic memberships.
-- depends: 0001_roles

CREATE TABLE clinics (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL,
    timezone   text NOT NULL DEFAULT 'UTC',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email      text NOT NULL UNIQUE,
    full_name  text NOT NULL,
    role       text NOT NULL CHECK (role IN ('doctor', 'nurse', 'admin', 'receptionist')),
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE clinic_memberships (
    clinic_id  uuid NOT NULL REFERENCES clinics,
    user_id    uuid NOT NULL REFERENCES users,
    role       text NOT NULL CHECK (role IN ('doctor', 'nurse', 'admin', 'receptionist')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (clinic_id, user_id)
);
CREATE INDEX clinic_memberships_user_id_idx ON clinic_memberships (user_id);
