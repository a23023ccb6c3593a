DROP TABLE prescriptions;
DROP TABLE encounters;
DROP TABLE appointments;
DROP TABLE providers;
DROP TABLE patients;
DROP FUNCTION hcrepo_touch_updated_at();
