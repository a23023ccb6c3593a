-- Appointments of the current clinic. A provider's live bookings never overlap: the
-- exclusion constraint appointments_no_double_booking refuses the second one (23P01).

-- name: get_appointment
SELECT id, clinic_id, patient_id, provider_id, starts_at, ends_at, status, reason,
       created_at, updated_at
FROM appointments
WHERE id = :id

-- name: provider_day
-- One calendar day in the clinic's own time zone, in start order.
SELECT a.id, a.clinic_id, a.patient_id, a.provider_id, a.starts_at, a.ends_at, a.status,
       a.reason, a.created_at, a.updated_at
FROM appointments AS a
JOIN clinics AS c ON c.id = a.clinic_id
WHERE a.provider_id = :provider_id
  AND a.starts_at >= :day::date::timestamp AT TIME ZONE c.timezone
  AND a.starts_at < (:day::date + 1)::timestamp AT TIME ZONE c.timezone
  AND (:include_cancelled OR a.status NOT IN ('cancelled', 'no_show'))
ORDER BY a.starts_at, a.id
LIMIT :limit

-- name: patient_appointments
SELECT id, clinic_id, patient_id, provider_id, starts_at, ends_at, status, reason,
       created_at, updated_at
FROM appointments
WHERE patient_id = :patient_id AND starts_at >= :since
ORDER BY starts_at, id
LIMIT :limit

-- name: book_appointment
-- Bookings of one provider queue on the provider's row first. Without that, concurrent
-- overlapping inserts wait on each other inside the exclusion check and deadlock (one victim
-- per deadlock_timeout); with it the first commits and the rest meet its row as a conflict.
-- The exclusion constraint stays the guarantee. An unknown provider books nothing (NotFound).
WITH provider AS (
    SELECT id FROM providers WHERE id = :provider_id FOR NO KEY UPDATE
)
INSERT INTO appointments (clinic_id, patient_id, provider_id, starts_at, ends_at, reason)
SELECT current_setting('app.clinic_id')::uuid, :patient_id, provider.id, :starts_at, :ends_at,
       :reason
FROM provider
RETURNING id, clinic_id, patient_id, provider_id, starts_at, ends_at, status, reason,
          created_at, updated_at

-- name: cancel_appointment
UPDATE appointments
SET status = 'cancelled'
WHERE id = :id AND status IN ('scheduled', 'checked_in')

-- name: reschedule_appointment
-- Only a scheduled appointment moves; the exclusion constraint guards the new slot.
UPDATE appointments
SET starts_at = :starts_at, ends_at = :ends_at
WHERE id = :id AND status = 'scheduled'
RETURNING id, clinic_id, patient_id, provider_id, starts_at, ends_at, status, reason,
          created_at, updated_at

-- name: set_appointment_status
UPDATE appointments
SET status = :status
WHERE id = :id
