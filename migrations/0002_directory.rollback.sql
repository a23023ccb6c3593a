DROP TABLE clinic_memberships;
DROP TABLE users;
DROP TABLE clinics;
