package ai.onnxruntime;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
public class OrtSession implements AutoCloseable {
  public Set<String> getInputNames() { return null; }
  public Map<String, NodeInfo> getInputInfo() throws OrtException { return null; }
  public Result run(Map<String, ? extends OnnxTensorLike> inputs) throws OrtException { return null; }
  @Override public void close() throws OrtException {}
  public static class SessionOptions implements AutoCloseable {
    public SessionOptions() {}
    public void setIntraOpNumThreads(int numThreads) throws OrtException {}
    @Override public void close() {}
  }
  public static class Result implements AutoCloseable {
    public Optional<OnnxValue> get(String key) { return null; }
    @Override public void close() {}
  }
}
