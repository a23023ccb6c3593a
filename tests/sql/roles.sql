-- Test-only queries of the staff-role tests (tests/test_break_glass.py).

-- name: roles_encounter_ids
SELECT id FROM encounters WHERE patient_id = :patient_id ORDER BY id
