-- Queries of benchmarks/bench_cache.py.

-- name: get_patient
SELECT id, clinic_id, mrn, first_name, last_name, date_of_birth, sex, phone, email, address
FROM patients WHERE id = :id

-- name: clinic_activity
SELECT pr.id AS provider_id, pr.display_name, count(e.id) AS encounters,
       count(DISTINCT e.patient_id) AS patients, max(e.occurred_at) AS last_seen
FROM providers pr
LEFT JOIN encounters e ON e.provider_id = pr.id
GROUP BY pr.id, pr.display_name
ORDER BY pr.display_name
