"""The healthcare domain built on hcrepo: row models and typed repositories over sql/*.sql.

Staff accounts (`users`) carry no clinic: a clinic sees and changes an account only through a
membership in the clinic in context (row-level security), so `UserRepository` is
tenant-scoped like the clinical repositories. Onboarding has one documented path:

    with db.context(clinic_id=clinic_id, actor_id=admin_id):
        nurse = UserRepository(db).onboard(email=..., full_name=..., role="nurse")

runs the database function `onboard_staff` (SECURITY DEFINER, owned by hcrepo_owner, fixed
search_path), which creates the account and its membership in the current clinic together and
refuses without a clinic; the application role cannot INSERT into users. An e-mail that
already exists is a `UniqueViolation`: the existing account is never attached. An existing
user joins another clinic with `StaffRepository(db).add(user_id=..., role=...)`; the id is
the capability, handed over by the user or a clinic they work for.
"""

from hcrepo.healthcare.models import (
    Appointment,
    AppointmentStatus,
    Clinic,
    Encounter,
    Patient,
    PatientSummary,
    Prescription,
    PrescriptionStatus,
    Provider,
    Sex,
    StaffMember,
    StaffRole,
    TimelineEntry,
    TimelineKind,
    User,
)
from hcrepo.healthcare.repositories import (
    AppointmentRepository,
    ClinicRepository,
    EncounterRepository,
    PatientRepository,
    PatientSort,
    PrescriptionRepository,
    ProviderRepository,
    StaffRepository,
    UserRepository,
)

__all__ = [
    "Appointment",
    "AppointmentRepository",
    "AppointmentStatus",
    "Clinic",
    "ClinicRepository",
    "Encounter",
    "EncounterRepository",
    "Patient",
    "PatientRepository",
    "PatientSort",
    "PatientSummary",
    "Prescription",
    "PrescriptionRepository",
    "PrescriptionStatus",
    "Provider",
    "ProviderRepository",
    "Sex",
    "StaffMember",
    "StaffRepository",
    "StaffRole",
    "TimelineEntry",
    "TimelineKind",
    "User",
    "UserRepository",
]
