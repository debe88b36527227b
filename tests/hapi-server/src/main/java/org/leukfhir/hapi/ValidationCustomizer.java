package org.leukfhir.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.config.JpaConfig;
import ca.uhn.fhir.validation.IInstanceValidatorModule;
import java.io.IOException;
import java.io.InputStream;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.springframework.beans.BeansException;
import org.springframework.beans.factory.config.BeanPostProcessor;

/**
 * Adjusts HAPI's validation beans as Spring creates them, so both request validation and
 * {@code $validate} see the same rules:
 *
 * <ul>
 *   <li>the JPA validation support chain gets, in first place, the code systems under
 *       {@code terminology/} (newer HL7 Terminology than FHIR 4.0.1 ships);
 *   <li>the instance validator is wrapped in {@link OfflineTerminologyLeniency}.
 * </ul>
 */
final class ValidationCustomizer implements BeanPostProcessor {

  /** Newer HL7 Terminology code systems, on the classpath (see terminology/README.md). */
  static final String[] CODE_SYSTEMS = {"terminology/CodeSystem-v3-ObservationValue.json"};

  /** HAPI's cached R4 context: a bean post-processor must not depend on other beans. */
  private final FhirContext fhirContext = FhirContext.forR4Cached();

  @Override
  public Object postProcessAfterInitialization(Object bean, String beanName) throws BeansException {
    if (bean instanceof ValidationSupportChain chain
        && JpaConfig.JPA_VALIDATION_SUPPORT_CHAIN.equals(beanName)) {
      chain.addValidationSupport(0, newerTerminology());
      return chain;
    }
    if (bean instanceof IInstanceValidatorModule validator
        && !(bean instanceof OfflineTerminologyLeniency)) {
      return new OfflineTerminologyLeniency(validator);
    }
    return bean;
  }

  private PrePopulatedValidationSupport newerTerminology() {
    PrePopulatedValidationSupport support = new PrePopulatedValidationSupport(fhirContext);
    for (String path : CODE_SYSTEMS) {
      try (InputStream in = getClass().getClassLoader().getResourceAsStream(path)) {
        if (in == null) {
          throw new IllegalStateException("missing classpath resource " + path);
        }
        IBaseResource codeSystem = fhirContext.newJsonParser().parseResource(in);
        support.addCodeSystem(codeSystem);
      } catch (IOException error) {
        throw new IllegalStateException("cannot read " + path, error);
      }
    }
    return support;
  }
}
