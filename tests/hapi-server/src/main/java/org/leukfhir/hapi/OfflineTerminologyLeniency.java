package org.leukfhir.hapi;

import ca.uhn.fhir.validation.IInstanceValidatorModule;
import ca.uhn.fhir.validation.IValidationContext;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import java.util.List;
import java.util.Locale;
import org.hl7.fhir.instance.model.api.IBaseResource;

/**
 * Wraps HAPI's instance validator and turns terminology errors about LOINC and SNOMED CT
 * codes into warnings.
 *
 * <p>LOINC and SNOMED CT cannot be loaded on an offline test machine, so their codes cannot be
 * checked; the leuk-fhir test policy is that problems with codes from these three systems never
 * reject a resource. Every other issue, structural or terminological, keeps HAPI's severity.
 * A downgraded message says so at its end.
 */
final class OfflineTerminologyLeniency implements IInstanceValidatorModule {

  /** Code systems whose terminology issues are reported as warnings at most. */
  static final List<String> LENIENT_SYSTEMS =
      List.of("http://loinc.org", "http://snomed.info/sct");

  static final String NOTE =
      " [leuk-fhir test server: terminology issue for LOINC/SNOMED CT reported as warning]";

  private final IInstanceValidatorModule delegate;

  OfflineTerminologyLeniency(IInstanceValidatorModule delegate) {
    this.delegate = delegate;
  }

  @Override
  public void validateResource(IValidationContext<IBaseResource> context) {
    int before = context.getMessages().size();
    delegate.validateResource(context);
    List<SingleValidationMessage> messages = context.getMessages();
    for (SingleValidationMessage message : messages.subList(before, messages.size())) {
      if (isLenientTerminologyError(message)) {
        message.setSeverity(ResultSeverityEnum.WARNING);
        message.setMessage(message.getMessage() + NOTE);
      }
    }
  }

  static boolean isLenientTerminologyError(SingleValidationMessage message) {
    ResultSeverityEnum severity = message.getSeverity();
    if (severity != ResultSeverityEnum.ERROR && severity != ResultSeverityEnum.FATAL) {
      return false;
    }
    String id = message.getMessageId() == null ? "" : message.getMessageId().toUpperCase(Locale.ROOT);
    boolean terminology =
        id.startsWith("TERMINOLOGY")
            || id.startsWith("TX_")
            || id.contains("CODESYSTEM")
            || id.contains("VALUESET")
            || id.contains("UCUM");
    String text = message.getMessage() == null ? "" : message.getMessage();
    return terminology && LENIENT_SYSTEMS.stream().anyMatch(text::contains);
  }
}
