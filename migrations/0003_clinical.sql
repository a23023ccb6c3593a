-- Clinical tables. Every one carries clinic_id, and every reference to another clinical
-- row goes through (clinic_id, id): foreign-key checks bypass row-level security, so a
-- plain reference would let one clinic point at another clinic's patient.
-- depends: 0002_directory

-- Keeps updated_at honest whatever the statement that changed the row.
CREATE FUNCTION hcrepo_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE patients (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id     uuid NOT NULL REFERENCES clinics,
    mrn           text NOT NULL,
    first_name    text NOT NULL,
    last_name     text NOT NULL,
    date_of_birth date NOT NULL,
    sex           text NOT NULL CHECK (sex IN ('female', 'male', 'other', 'unknown')),
    phone         text,
    email         text,
    address       text,
    ssn           text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, mrn),
    UNIQUE (clinic_id, id)
);
CREATE INDEX patients_clinic_name_idx ON patients (clinic_id, last_name, first_name);
CREATE INDEX patients_clinic_dob_idx ON patients (clinic_id, date_of_birth);
CREATE TRIGGER patients_touch_updated_at BEFORE UPDATE ON patients
    FOR EACH ROW EXECUTE FUNCTION hcrepo_touch_updated_at();

CREATE TABLE providers (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id    uuid NOT NULL REFERENCES clinics,
    user_id      uuid REFERENCES users,
    display_name text NOT NULL,
    specialty    text,
    npi          text,
    active       boolean NOT NULL DEFAULT true,
    on_call      boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, id)
);
CREATE INDEX providers_user_id_idx ON providers (user_id);

CREATE TABLE appointments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id   uuid NOT NULL REFERENCES clinics,
    patient_id  uuid NOT NULL,
    provider_id uuid NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    status      text NOT NULL DEFAULT 'scheduled'
                CHECK (status IN ('scheduled', 'checked_in', 'completed', 'cancelled', 'no_show')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    UNIQUE (clinic_id, id),
    FOREIGN KEY (clinic_id, patient_id) REFERENCES patients (clinic_id, id),
    FOREIGN KEY (clinic_id, provider_id) REFERENCES providers (clinic_id, id),
    -- A provider's live bookings never overlap; cancelled and no-show slots free the time.
    CONSTRAINT appointments_no_double_booking EXCLUDE USING gist (
        provider_id WITH =, tstzrange(starts_at, ends_at) WITH &&
    ) WHERE (status NOT IN ('cancelled', 'no_show'))
);
CREATE INDEX appointments_clinic_provider_idx ON appointments (clinic_id, provider_id, starts_at);
CREATE INDEX appointments_clinic_patient_idx ON appointments (clinic_id, patient_id, starts_at);
CREATE TRIGGER appointments_touch_updated_at BEFORE UPDATE ON appointments
    FOR EACH ROW EXECUTE FUNCTION hcrepo_touch_updated_at();

CREATE TABLE encounters (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id       uuid NOT NULL REFERENCES clinics,
    patient_id      uuid NOT NULL,
    provider_id     uuid NOT NULL,
    appointment_id  uuid,
    occurred_at     timestamptz NOT NULL,
    note            text NOT NULL,
    diagnosis_codes text[] NOT NULL DEFAULT '{}',
    signed_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (clinic_id, id),
    FOREIGN KEY (clinic_id, patient_id) REFERENCES patients (clinic_id, id),
    FOREIGN KEY (clinic_id, provider_id) REFERENCES providers (clinic_id, id),
    FOREIGN KEY (clinic_id, appointment_id) REFERENCES appointments (clinic_id, id)
);
CREATE INDEX encounters_clinic_patient_idx ON encounters (clinic_id, patient_id, occurred_at);
CREATE INDEX encounters_clinic_provider_idx ON encounters (clinic_id, provider_id);
CREATE INDEX encounters_clinic_appointment_idx ON encounters (clinic_id, appointment_id);

CREATE TABLE prescriptions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    clinic_id     uuid NOT NULL REFERENCES clinics,
    patient_id    uuid NOT NULL,
    prescriber_id uuid NOT NULL,
    encounter_id  uuid,
    drug_name     text NOT NULL,
    dosage        text NOT NULL,
    frequency     text NOT NULL,
    quantity      integer NOT NULL CHECK (quantity > 0),
    refills       integer NOT NULL DEFAULT 0 CHECK (refills >= 0),
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'completed', 'cancelled')),
    prescribed_at timestamptz NOT NULL DEFAULT now(),
    notes         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (clinic_id, patient_id) REFERENCES patients (clinic_id, id),
    FOREIGN KEY (clinic_id, prescriber_id) REFERENCES providers (clinic_id, id),
    FOREIGN KEY (clinic_id, encounter_id) REFERENCES encounters (clinic_id, id)
);
CREATE INDEX prescriptions_clinic_patient_idx ON prescriptions (clinic_id, patient_id, prescribed_at);
CREATE INDEX prescriptions_clinic_prescriber_idx ON prescriptions (clinic_id, prescriber_id);
CREATE INDEX prescriptions_clinic_encounter_idx ON prescriptions (clinic_id, encounter_id);
