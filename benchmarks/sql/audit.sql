-- name: touch_patient
UPDATE patients SET phone = :phone WHERE id = :id

-- name: bulk_patients
INSERT INTO patients (clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone)
SELECT current_setting('app.clinic_id')::uuid, :prefix || g, 'Bulk' || g, 'Patient',
       DATE '1950-01-01' + (g % 20000), 'unknown', '+1 555 ' || g
FROM generate_series(1, :count) AS g
